"""``fedtune`` command line.

    fedtune run [CONFIG.yaml] [key=value ...] [--out RUN_DIR]   run an experiment (default: embedded)
    fedtune run --resume RUN_DIR                                continue a killed run
    fedtune report RUN_DIR                                      print a finished run's table
    fedtune export RUN_DIR OUT [--merge]                        the model as a HF / peft folder
    fedtune generate RUN_DIR|MODEL_DIR "instruction" [--input]  the tuned model answers
    fedtune compare RUN_DIR... [--out DIR]                      table, plots and report of runs
    fedtune methods                                             list the methods
    fedtune config [CONFIG.yaml] [key=value ...]                print the resolved config

A mistake the user can fix (bad config, missing file or package) ends with exit status 2 and one
line naming it; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtune.engines.flower import cli as flower_cli

USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment (no CONFIG: the embedded default)")
    run.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                     help="an optional YAML config file, then key=value overrides")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    run.add_argument("--out", metavar="RUN_DIR", help="run folder (default: output.dir/NAME)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (default: refuse)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    rep = sub.add_parser("report", help="print the metrics table of a run folder")
    rep.add_argument("run_dir")
    exp = sub.add_parser("export", help="export a run's model as a Hugging Face / peft folder")
    exp.add_argument("run_dir")
    exp.add_argument("out", help="folder to write (absent, empty, or a previous export)")
    exp.add_argument("--merge", action="store_true",
                     help="FedIT / FeDeRA: merge the adapters into the base (a full HF folder)")
    gen = sub.add_parser("generate", help="the tuned model answers an instruction")
    gen.add_argument("model", metavar="RUN_DIR|MODEL_DIR",
                     help="a run folder, or an exported (or any) Hugging Face / adapter folder")
    gen.add_argument("instruction")
    gen.add_argument("--input", default="", help="the input the instruction refers to")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy; above 0: sampled")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    cmp_ = sub.add_parser("compare", help="compare runs: table, plots, markdown report")
    cmp_.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp_.add_argument("--out", default="report", metavar="DIR",
                      help="where table.md, the PNG plots and report.md go (default: report)")
    sub.add_parser("methods", help="list the methods")
    conf = sub.add_parser("config", help="print the resolved config")
    conf.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    flower_cli.add_parser(sub)  # fedtune flower local|app|supernode|certs
    return p


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(items: list[str]):
    from fedtune.config import load_config

    path, overrides = _split_items(items)
    return load_config(path, overrides)


def _cmd_run(args) -> int:
    from fedtune.config import load_config
    from fedtune.engines.inprocess import run
    from fedtune.engines.rounds import default_run_dir

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise _UserError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
        if args.items:
            raise _UserError("--resume takes the run folder only; its config.yaml is reused")
        cfg = load_config(run_dir / "config.yaml")
        run(cfg, run_dir, resume=True, progress=not args.quiet)
        return 0
    cfg = _load(args.items)
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    run(cfg, run_dir, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        _print_readout(run_dir)
    return 0


def _print_readout(run_dir: Path) -> None:
    """After a run: its final metrics beside their trivial baselines, its bytes beside
    FedAvg's, and where the run folder is."""
    from fedtune.compare import baseline_lines, bytes_line, read_run

    r = read_run(run_dir)
    print("", *baseline_lines(r), *filter(None, [bytes_line(r)]), f"run folder: {run_dir}",
          sep="\n")


def _cmd_report(args) -> int:
    from fedtune.compare import baseline_lines, read_run
    from fedtune.engines.rounds import summary_table
    from fedtune.runlog import RunLog

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise _UserError(f"{args.run_dir}: no metrics.jsonl; is it a run folder?")
    log = RunLog(Path(args.run_dir))
    rows = log.read_metrics()
    print(summary_table(rows))
    if rows:
        print("", *baseline_lines(read_run(log.dir)), sep="\n")
    summary = log.dir / "summary.json"
    if summary.is_file():
        print(json.dumps(json.loads(summary.read_text()), indent=2))
    return 0


def _cmd_export(args) -> int:
    from fedtune.export import export_run

    out = export_run(args.run_dir, args.out, merge=args.merge)
    info = json.loads((out / "fedtune_export.json").read_text())
    print(f"{info['kind']} export of {args.run_dir} ({info['method']}) in {out}; load with "
          f"{info['load']}")
    return 0


def _cmd_generate(args) -> int:
    from fedtune.export import answer, load_for_generation

    if args.max_new_tokens < 1:
        raise _UserError("--max-new-tokens must be at least 1")
    model, tokenizer = load_for_generation(args.model)
    text = answer(model, tokenizer, args.instruction, args.input,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  seed=args.seed)
    print(text)
    if not text:
        print("fedtune: the model's answer is empty (it ended the answer at once, or wrote only "
              "whitespace or special tokens)", file=sys.stderr)
    return 0


def _cmd_compare(args) -> int:
    from fedtune.compare import compare

    report = compare(args.run_dirs, args.out)
    print(report.table_text)
    print(f"\nwrote {report.out / 'report.md'} ({', '.join(p.name for p in report.files)})")
    return 0


def _cmd_methods(args) -> int:
    from fedtune.methods.registry import METHODS

    for name, spec in sorted(METHODS.items()):
        print(f"{name:14s} {spec.summary}")
    return 0


def _cmd_config(args) -> int:
    import yaml

    from fedtune.config import to_dict

    print(yaml.safe_dump(to_dict(_load(args.items)), sort_keys=False), end="")
    return 0


class _UserError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fedtune.compare import CompareError
    from fedtune.config import ConfigError
    from fedtune.data import DataFileNotFoundError, DataFormatError
    from fedtune.export import ExportError
    from fedtune.models import ModelNotFoundError
    from fedtune.runlog import CheckpointError, RunFolderError

    user_errors = (_UserError, ConfigError, ModelNotFoundError, DataFileNotFoundError,
                   DataFormatError, CheckpointError, RunFolderError, ExportError, CompareError)
    commands = {"run": _cmd_run, "report": _cmd_report, "methods": _cmd_methods,
                "config": _cmd_config, "export": _cmd_export, "generate": _cmd_generate,
                "compare": _cmd_compare, "flower": flower_cli.handle}
    try:
        return commands[args.command](args)
    except user_errors as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("fedtune: interrupted; resume with fedtune run --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
