"""``fedtune`` command line.

    fedtune run [CONFIG.yaml] [key=value ...] [--out RUN_DIR]   run an experiment (default: embedded)
    fedtune run --resume RUN_DIR                                continue a killed run
    fedtune report RUN_DIR                                      print a finished run's table
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
    run(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def _cmd_report(args) -> int:
    from fedtune.engines.inprocess import summary_table
    from fedtune.runlog import RunLog

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise _UserError(f"{args.run_dir}: no metrics.jsonl; is it a run folder?")
    log = RunLog(Path(args.run_dir))
    print(summary_table(log.read_metrics()))
    summary = log.dir / "summary.json"
    if summary.is_file():
        print(json.dumps(json.loads(summary.read_text()), indent=2))
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
    from fedtune.config import ConfigError
    from fedtune.data import DataFileNotFoundError, DataFormatError
    from fedtune.models import ModelNotFoundError
    from fedtune.runlog import CheckpointError, RunFolderError

    user_errors = (_UserError, ConfigError, ModelNotFoundError, DataFileNotFoundError,
                   DataFormatError, CheckpointError, RunFolderError)
    commands = {"run": _cmd_run, "report": _cmd_report, "methods": _cmd_methods,
                "config": _cmd_config, "flower": flower_cli.handle}
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
