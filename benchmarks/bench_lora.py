"""FeDeRA and FedIT against full-parameter methods, run through the in-process engine
(``fedtune.engines.inprocess.run``, the code path of ``fedtune run``).

* ``--part hetero``: MiniLM + classification head on Rotten Tomatoes, clients split by
  Dirichlet(alpha) over the labels; held-out accuracy per round for FeDeRA, FedIT and FedAvg
  (full parameters) at each alpha; trainable parameters, bytes per client per round (the
  encoded messages) and training time until a target accuracy.
* ``--part instruct``: SmolLM2-135M on the Natural Instructions subset with exactly the settings
  of ``bench_ferret.py --part accuracy`` (same partition, sampled clients, local steps and
  evaluation), so FeDeRA's and FedIT's evaluation loss per round and Rouge-L sit beside the
  FedAvg, FedKSeed and Ferret rows that ``benchmarks/ferret.json`` holds.

Results go to ``benchmarks/lora.json`` (per part) and the tables to ``benchmarks/lora.md``::

    flock /tmp/fedtune-bench.lock python benchmarks/bench_lora.py --part hetero
    flock /tmp/fedtune-bench.lock python benchmarks/bench_lora.py --part instruct
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_ferret import COMMON as FERRET_COMMON
from benchinfo import environment

from fedtune.config import ExperimentConfig, load_config
from fedtune.data import load_dataset, partition
from fedtune.engines.inprocess import run

HERE = Path(__file__).resolve().parent
KEEP = ("round", "clients", "accuracy", "eval_loss", "rouge_l", "train_loss", "bytes_up_per_client",
        "bytes_down_per_client", "time_round", "time_eval", "time_apply", "time_fit",
        "peak_rss_mb")

# label -> config overrides of that method (the learning rate is each family's usual one)
HETERO_METHODS = {
    "FeDeRA": {"method.name": "federa", "method.rank": 16, "method.alpha": 32, "train.lr": 1e-3},
    "FedIT": {"method.name": "fedit", "method.rank": 16, "method.alpha": 32, "train.lr": 1e-3},
    "FedAvg (full)": {"method.name": "fedavg", "train.lr": 1e-4},
}
INSTRUCT_METHODS = {
    "FeDeRA": {"method.name": "federa", "method.rank": 8, "method.alpha": 16,
               "train.optimizer": "adamw", "train.lr": 3e-4},
    "FedIT": {"method.name": "fedit", "method.rank": 8, "method.alpha": 16,
              "train.optimizer": "adamw", "train.lr": 3e-4},
}
FERRET_ROWS = {"fedavg": "FedAvg (full, ferret.json)", "fedkseed": "FedKSeed (ferret.json)",
               "ferret": "Ferret (ferret.json)",
               "ferret-k2048-rademacher": "Ferret K=2048 Rademacher (ferret.json)"}


def config(overrides: dict[str, Any]) -> ExperimentConfig:
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def run_method(overrides: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    cfg = config(overrides)
    t0 = time.perf_counter()
    rows = run(cfg, workdir / name, progress=False)
    wall = time.perf_counter() - t0
    summary = json.loads((workdir / name / "summary.json").read_text())
    rows = [{k: r[k] for k in KEEP if k in r} for r in rows]
    print(f"  {name}: " + ", ".join(f"{r.get('accuracy', r['eval_loss']):.3f}" for r in rows)
          + f"  ({wall:.0f} s)", flush=True)
    return {"rows": rows, "wall_s": wall, "trainable_params": summary["trainable_params"],
            "model_params": summary["model_params"]}


def train_clock(rows: list[dict[str, Any]]) -> list[float]:
    """Cumulative seconds of federated training after each round: the round's time without
    the evaluation (and the evaluator's sync to the new global model)."""
    clock, out = 0.0, [0.0]
    for r in rows[1:]:
        clock += r["time_round"] - r.get("time_eval", 0.0) - r.get("time_apply", 0.0)
        out.append(clock)
    return out


def hetero(args, workdir: Path, save) -> dict[str, Any]:
    common = {"seed": args.seed, "model.source": "minilm", "data.source": "rotten_tomatoes",
              "data.task": "classification", "data.max_length": 64,
              "partition.scheme": "dirichlet", "partition.num_clients": args.clients,
              "partition.min_client_size": 16, "federation.rounds": args.rounds,
              "federation.clients_per_round": args.fraction,
              "federation.weighting": "examples", "train.optimizer": "adamw",
              "train.local_steps": args.steps, "train.batch_size": args.batch,
              "eval.max_examples": args.test, "eval.batch_size": 100,
              "output.save_model": False}
    out: dict[str, Any] = {"common": common, "methods": HETERO_METHODS, "alphas": {}}
    for alpha in args.alphas:
        base = {**common, "partition.alpha": alpha}
        cfg = config(base)
        # the split and partition the engine builds, not encoded
        data = load_dataset(cfg.data, cfg.seed)
        parts = partition(data.train, cfg.partition, cfg.seed)
        sizes = [len(p) for p in parts]
        fresh = [round(sum(data.train[i]["label"] for i in p) / len(p), 2) for p in parts]
        n_test = min(len(data.test), cfg.eval.max_examples)
        print(f"alpha={alpha}: client sizes {sizes}, fraction fresh {fresh}", flush=True)
        res: dict[str, Any] = {"client_sizes": sizes, "fraction_fresh": fresh,
                               "test_examples": n_test, "methods": {}}
        for label, over in HETERO_METHODS.items():
            res["methods"][label] = run_method({**base, **over}, workdir,
                                               f"a{alpha}-{over['method.name']}")
            out["alphas"][str(alpha)] = res
            save(out)
    return out


def instruct(args, workdir: Path, save) -> dict[str, Any]:
    out: dict[str, Any] = {"common": FERRET_COMMON, "methods": INSTRUCT_METHODS, "runs": {}}
    for label, over in INSTRUCT_METHODS.items():
        out["runs"][label] = run_method({**FERRET_COMMON, **over}, workdir, over["method.name"])
        save(out)
    return out


# --- report ------------------------------------------------------------------------------------


def _machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores (load average {m['load_avg_at_start']:.1f}"
            f" at start), torch threads {m['torch_threads']}; Python {m['python']}, torch "
            f"{m['torch']}, transformers {m['transformers']}, peft {m['peft']}, fedtune "
            f"{m['fedtune_commit']}.")


def _settings(common: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in common.items())


def _time_to(rows: list[dict[str, Any]], target: float) -> str:
    for row, clock in zip(rows, train_clock(rows)):
        if row["accuracy"] >= target:
            return f"{clock:.0f} s (round {row['round']})"
    return "not reached"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean over the trained rounds (Ferret's and FedKSeed's downloads vary by round)."""
    return sum(r[key] for r in rows[1:]) / (len(rows) - 1)


def render_hetero(h: dict[str, Any], notes: str) -> list[str]:
    targets = h["targets"]
    lines = ["## Heterogeneity: MiniLM on Rotten Tomatoes, Dirichlet(alpha) over labels", "",
             f"Command: `{h['command']}`  ", _machine_line(h["machine"]) + "  ",
             f"Settings (in-process engine): `{_settings(h['common'])}`  ",
             "Methods: " + "; ".join(f"{k}: `{_settings(v)}`" for k, v in h["methods"].items())
             + ".", ""]
    labels = list(h["methods"])
    for alpha, res in h["alphas"].items():
        runs = res["methods"]
        lines += [f"### alpha = {alpha}", "",
                  (f"Client sizes {res['client_sizes']}; fraction 'fresh' per client "
                   f"{res['fraction_fresh']}; {res['test_examples']} held-out examples."), "",
                  ("'fresh share': the fraction of 'fresh' labels among the examples of the "
                   "round's sampled clients (the weights of that round's average)."), "",
                  "| round | fresh share | " + " | ".join(labels) + " |",
                  "|---" * (len(labels) + 2) + "|"]
        for i, row in enumerate(runs[labels[0]]["rows"]):
            share = "-"
            if row.get("clients"):
                n = [res["client_sizes"][c] for c in row["clients"]]
                fresh = [res["fraction_fresh"][c] for c in row["clients"]]
                share = f"{sum(a * b for a, b in zip(n, fresh)) / sum(n):.2f}"
            lines.append(f"| {row['round']} | {share} | " + " | ".join(
                f"{runs[lb]['rows'][i]['accuracy']:.3f}" for lb in labels) + " |")
        lines.append("")
    alphas = list(h["alphas"])
    lines += ["### Summary: held-out accuracy per alpha (final / best / mean of the last 5 rounds)",
              "", "| method | " + " | ".join(f"alpha={a}" for a in alphas) + " |",
              "|---" * (len(alphas) + 1) + "|"]
    for lb in labels:
        cells = []
        for a in alphas:
            acc = [r["accuracy"] for r in h["alphas"][a]["methods"][lb]["rows"]]
            last = acc[-5:]
            cells.append(f"{acc[-1]:.3f} / {max(acc):.3f} / {sum(last) / len(last):.3f}")
        lines.append(f"| {lb} | " + " | ".join(cells) + " |")
    lines += ["", "### Cost and time to a target accuracy (" + ", ".join(
        f"{t:.2f}" for t in targets) + ")", "",
              ("Bytes: `len()` of the encoded messages per client per round (the same every "
               "round). Time to target: cumulative training time of the simulated federation "
               "(the sampled clients one after another, download, aggregation; evaluation "
               "excluded) until the held-out accuracy first reaches the target. 'client fit s': "
               "mean seconds of one client's local training and encoding, over all rounds and "
               "alphas."), "",
              "| method | trainable params | % of model | bytes up | bytes down | client fit s | "
              + " | ".join(f"to {t:.2f}, alpha={a}" for t in targets for a in alphas) + " |",
              "|---" * (6 + len(targets) * len(alphas)) + "|"]
    for lb in labels:
        first = h["alphas"][alphas[0]]["methods"][lb]
        fits = [r["time_fit"] / len(r["clients"]) for a in alphas
                for r in h["alphas"][a]["methods"][lb]["rows"][1:]]
        lines.append(
            f"| {lb} | {first['trainable_params']:,} | "
            f"{100 * first['trainable_params'] / first['model_params']:.2f} | "
            f"{_mean(first['rows'], 'bytes_up_per_client'):,.0f} | "
            f"{_mean(first['rows'], 'bytes_down_per_client'):,.0f} | "
            f"{sum(fits) / len(fits):.2f} | "
            + " | ".join(_time_to(h["alphas"][a]["methods"][lb]["rows"], t)
                         for t in targets for a in alphas) + " |")
    return lines + ["", notes, ""] if notes else lines + [""]


def render_instruct(ins: dict[str, Any], ferret: dict[str, Any], notes: str) -> list[str]:
    runs = {lb: v["rows"] for lb, v in ins["runs"].items()}
    for key, lb in FERRET_ROWS.items():
        if key in ferret:
            runs[lb] = ferret[key]["rows"]
    n = max(len(r) for r in runs.values())
    lines = ["## Instruction tuning: SmolLM2-135M on the Natural Instructions subset", "",
             f"Command: `{ins['command']}`  ", _machine_line(ins["machine"]) + "  ",
             (f"Settings (those of `bench_ferret.py --part accuracy`): "
              f"`{_settings(ins['common'])}`  "),
             "LoRA methods: " + "; ".join(f"{k}: `{_settings(v)}`"
                                          for k, v in ins["methods"].items()) + ".  ",
             ("Rows marked ferret.json are the full-parameter runs of `benchmarks/ferret.json` "
              "(same settings and seed, so the same clients and batches; their own optimizer "
              "settings are in ferret.md). Rouge-L: F-measure of `rouge-score` on greedy "
              "generations."), "",
             "| method | " + " | ".join(f"r{i}" for i in range(n))
             + " | Rouge-L before | Rouge-L after | trainable params | bytes up | bytes down"
             " (mean per client and round) |",
             "|---" * (n + 6) + "|"]
    for lb, rows in runs.items():
        params = ins["runs"][lb]["trainable_params"] if lb in ins["runs"] else None
        lines.append(
            f"| {lb} | " + " | ".join(f"{r['eval_loss']:.4f}" for r in rows)
            + f" | {rows[0].get('rouge_l', float('nan')):.4f} | "
            f"{rows[-1].get('rouge_l', float('nan')):.4f} | "
            + (f"{params:,}" if params else "all") + " | "
            f"{_mean(rows, 'bytes_up_per_client'):,.0f} | "
            f"{_mean(rows, 'bytes_down_per_client'):,.0f} |")
    return lines + ["", notes, ""] if notes else lines + [""]


def render(results: dict[str, Any], json_name: str = "lora.json") -> str:
    lines = ["# FeDeRA and FedIT against full-parameter methods", "",
             ("Written by `benchmarks/bench_lora.py` through the in-process engine (the code path "
              f"of `fedtune run`); raw numbers in `benchmarks/{json_name}`. Every method sees the "
              "same partition, the same sampled clients per round and the same batches."), ""]
    if "hetero" in results:
        lines += render_hetero(results["hetero"], results.get("notes", {}).get("hetero", ""))
    if "instruct" in results:
        ferret_json = HERE / "ferret.json"
        ferret = json.loads(ferret_json.read_text()).get("accuracy", {}) \
            if ferret_json.is_file() else {}
        lines += render_instruct(results["instruct"], ferret,
                                 results.get("notes", {}).get("instruct", ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["hetero", "instruct"])
    p.add_argument("--render", action="store_true", help="only rewrite lora.md from lora.json")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.5, help="clients sampled per round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=5, help="local steps per client and round")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--test", type=int, default=400, help="held-out examples evaluated")
    p.add_argument("--targets", type=float, nargs="+", default=[0.70, 0.75],
                   help="accuracies for the time-to-target columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=HERE / "lora.json")
    p.add_argument("--md", type=Path, default=HERE / "lora.md")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if not args.render:
        if args.part is None:
            p.error("--part is required (or --render)")
        torch.set_num_threads(args.threads)
        info = environment()
        t0 = time.perf_counter()
        command = "python benchmarks/bench_lora.py " + " ".join(
            sys.argv[1:] if argv is None else argv)

        def save(out: dict[str, Any]) -> None:
            """After every method: a killed sweep keeps what it measured."""
            out.update(machine=info, wall_s=time.perf_counter() - t0, command=command)
            if args.part == "hetero":
                out["targets"] = args.targets
            results[args.part] = out
            args.json.write_text(json.dumps(results, indent=1) + "\n")

        with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
            fn = hetero if args.part == "hetero" else instruct
            fn(args, Path(tmp), save)
        print(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.json}")
    elif "hetero" in results:
        results["hetero"]["targets"] = args.targets
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    args.md.write_text(render(results, args.json.name))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
