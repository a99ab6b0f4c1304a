"""Client-level differential privacy: utility against epsilon (issue 14).

For each method, one run without noise and without clipping (``privacy.enabled`` with a clip
norm no update reaches and noise multiplier 0: the same unweighted fixed-denominator mean as the
private runs, so only clipping and noise differ), which records every client's update norm in
the space its method sums; the clip norm C of the private runs is the median of those norms
(the usual DP-FedAvg choice: about half the updates are clipped). Then one run per target
epsilon at ``delta`` 1e-5 (``privacy.target_epsilon``: the accountant chooses the noise
multiplier for the planned rounds, with fedtune's fixed-size sampling). Central noise. Results
are merged into ``benchmarks/privacy.json`` (keyed by setting, method, epsilon) and the whole
table is rendered to ``benchmarks/privacy.md``::

    flock /tmp/fedtune-bench.lock python benchmarks/bench_privacy.py --setting minilm
    flock /tmp/fedtune-bench.lock python benchmarks/bench_privacy.py --setting smollm2 \\
        --methods federa --eps inf 16 1

Settings: ``minilm`` is MiniLM / Rotten Tomatoes classification (the demo's task) on 100 iid
clients, 10 sampled per round; ``smollm2`` is SmolLM2-135M on the Natural Instructions subset
(one client per training task, 6 of the 48 per round, 3 rounds). FedKSeed runs there with a
pool of K = 256 seeds: central noise goes on every seed, so each sync rebuilds all K
directions (K x 134.5M Gaussian entries; at the default K = 4096 that is minutes per sync on
this machine), and the noise's norm grows as sqrt(K).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

from benchinfo import environment

from fedtune.config import load_config
from fedtune.engines.inprocess import run
from fedtune.methods import privacy

HERE = Path(__file__).resolve().parent
JSON, MD = HERE / "privacy.json", HERE / "privacy.md"
NI_PATH = "/work/shared/data/natural-instructions"
NO_CLIP = 1e30
FINDINGS = """\
* **SmolLM2 / NI: 48 clients (one per training task), 6 sampled per round, 3 rounds.** Eval loss on
  32 held-out test-task examples, 3.124 before training. One epsilon gives every method the same
  noise multiplier (0.871, 1.88 and 4.09 at epsilon 16, 4 and 1: same sampling rate 6/48, rounds
  and delta). What differs is the space the noise lands in: FeDeRA's 921,600 adapter entries,
  Ferret's (seed, block) table of 42,200 entries (pool 200 x 211 blocks) and FedKSeed's 256
  per-seed sums. Without noise FeDeRA learns most (1.982), then Ferret reference (2.132) and
  FedKSeed (2.961, zeroth order, 10 steps per client).
  * **FeDeRA**: 2.941, 7.644 and 15.29 at epsilon 16, 4 and 1. The noise's norm is 139, 301
    and 655 C. At epsilon 16 it keeps a sixth of its no-noise gain (0.18 of 1.14 nats); at 4
    and 1 the noise drives the model far above where it started.
  * **FedKSeed**: 3.117, 3.346 and 4.658. The noise's norm is 2.3, 5.0 and 10.9 C. At epsilon
    16 it keeps none of its small gain, but at 4 and 1 it ends only 0.22 and 1.53 nats above the
    untrained model, where FeDeRA ends 4.5 and 12.2 above it: the K-dimensional summed space is
    where a small federation's noise does least harm.
  * **Ferret reference mode**: 26.12, 33.72 and 42.48 at epsilon 16, 4 and 1. The noise's norm
    is 29.8, 64.3 and 140 C, less than FeDeRA's, yet the model is thrown off further. Its
    coordinates carry the authors' d_l / K_l scale (unbiased, but their norm is about
    sqrt(d_l / 3 K_l) times the update's own), so the clip
    norm C (16.4, the median client norm) is set by that inflated norm, and the noise, scaled to
    C, reaches every one of the 42,200 (seed, block) terms of the reconstruction. (That the
    inflation is the cause is a reading of these numbers, not a measurement.)
  * **Central noise costs the seed methods compute.** The noise goes on every seed (a seed left
    unnoised would show which clients took part), so each sync rebuilds all K directions, not
    only the at most 60 that the round's steps touched. At K 256 a private FedKSeed run took
    320-324 s against 250 s without noise. At the default K 4096 a private run had not finished
    after 7.5 minutes (killed; 241 s for the whole run without noise): a sync is then 4096 x
    134.5M Gaussian entries, about 330 s at the 1,690 M/s of `benchmarks/randomness.md`. So a
    private FedKSeed wants a small K, which also shrinks the noise's norm as sqrt(K). Ferret's
    noise makes all 42,200 table entries non-zero: a rebuild is then 200 bases per block, 26.9G
    truncated-normal entries, about 11 s at that file's 2,390 M/s, per party per round.
* **MiniLM / Rotten Tomatoes: a federation of 10 clients per round cannot buy useful privacy for
  FeDeRA here.** Without noise FeDeRA reaches 0.795 (majority 0.555); at epsilon 16 the
  calibrated noise multiplier is 0.92, so the noise per coordinate of the mean is 0.092 C, but
  over the 148,226 summed coordinates (rank-16 adapters and the head) its norm is 35 C against
  at most C of signal: the accuracy stays at the majority share (0.542, 0.532, 0.470 at epsilon
  16, 4, 1). The noise norm falls as 1 / m: the same epsilon with about 35x the clients per
  round (hundreds, at the same sampling rate) would bring it to about C, which is why DP-FedAvg
  results use thousands of clients.
* **The seed-based methods do not learn on MiniLM** within a budget this machine can run, even
  without noise, so their private rows there would measure nothing:
  * FedKSeed: a pilot with 100 clients, 10 per round, 2 rounds of 100 zeroth-order steps gave
    accuracy 0.5825 before, 0.5775 at eta 1e-5 and 0.5725 at eta 1e-4, in 830-960 s per run.
  * Ferret reference mode, three settings, 5 rounds unless said: AdamW 1e-3, 10 steps,
    server_lr 1 stayed at the majority share (0.555 after 2 rounds, 291 s). With server_lr 10 it
    diverged (accuracy 0.445, eval loss 1.18, median update norm 783). With AdamW 1e-4 and
    server_lr 10 (the table's row) it stayed put: 0.545, eval loss 0.6853 from 0.6858.
  * This is what `benchmarks/demo_trials.md` found for Ferret on MiniLM: the reconstruction
    error, about sqrt(d/K) times the update, swamps a few steps of a 22M-parameter encoder.
* Clipping at the median norm clips 50-89% of the updates (the share grows as the noise
  pushes the model away and the updates grow).
"""

SETTINGS: dict[str, dict[str, Any]] = {
    "minilm": {
        "model.source": "minilm", "data.source": "rotten_tomatoes",
        "data.task": "classification", "data.max_length": 48, "eval.max_examples": 400,
        "eval.batch_size": 100, "output.save_model": False, "partition.scheme": "iid",
        "partition.num_clients": 100, "federation.clients_per_round": 0.1,
        "federation.rounds": 5, "train.batch_size": 16,
    },
    "smollm2": {
        "model.source": "smollm2", "data.source": "natural_instructions", "data.path": NI_PATH,
        "data.task": "instruction", "data.max_length": 128, "partition.scheme": "task",
        "federation.rounds": 3, "federation.clients_per_round": 0.125,
        "train.optimizer": "sgd", "train.lr": 0.002, "train.local_steps": 3,
        "train.batch_size": 2, "eval.max_examples": 32, "eval.batch_size": 16,
        "eval.generate_every": 0, "eval.generate_examples": 0, "output.save_model": False,
    },
}
METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "minilm": {
        "federa": {"method.name": "federa", "method.rank": 16, "method.alpha": 32,
                   "train.optimizer": "adamw", "train.lr": 1e-3, "train.local_steps": 10},
        "fedkseed": {"method.name": "fedkseed", "method.eta": 1e-4, "method.k": 1024,
                     "train.local_steps": 100},
        "ferret-reference": {"method.name": "ferret", "method.mode": "reference",
                             "train.optimizer": "adamw", "train.lr": 1e-3,
                             "train.local_steps": 10},
    },
    "smollm2": {
        "federa": {"method.name": "federa", "method.rank": 16, "method.alpha": 32},
        "fedkseed": {"method.name": "fedkseed", "method.mode": "keep", "method.k": 256,
                     "train.local_steps": 10},
        "ferret-reference": {"method.name": "ferret", "method.mode": "reference"},
    },
}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


class NormLog:
    """Records the norm and size of every update a client clips (``Mechanism.factor``) and the
    number of entries the server's central noise covers (``Mechanism.central_noise``: for
    Ferret's reference mode the whole (seed, block) table, more than a client's coordinates)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.sizes: set[int] = set()
        self.noised: set[int] = set()
        self._orig = privacy.Mechanism.factor, privacy.Mechanism.central_noise

    def __enter__(self) -> Self:
        log, (factor_of, noise_of) = self, self._orig

        def factor(mech, norm: float, base_norm: float = 0.0, count: int = 0) -> float:
            log.norms.append(float(norm))
            log.sizes.add(int(count))
            return factor_of(mech, norm, base_norm, count)

        def central_noise(mech, round_: int, shapes):
            shapes = [tuple(s) for s in shapes]
            log.noised.add(sum(math.prod(s) for s in shapes))
            return noise_of(mech, round_, shapes)

        privacy.Mechanism.factor = factor
        privacy.Mechanism.central_noise = central_noise
        return self

    def __exit__(self, *exc) -> None:
        privacy.Mechanism.factor, privacy.Mechanism.central_noise = self._orig


def run_one(setting: str, method: str, eps: float, clip: float, work: Path,
            extra: dict[str, Any]) -> dict[str, Any]:
    opts = {**SETTINGS[setting], **METHODS[setting][method], **extra,
            "privacy.enabled": True, "privacy.delta": 1e-5, "privacy.clip_norm": clip}
    if math.isinf(eps):
        opts["privacy.noise_multiplier"] = 0.0
    else:
        opts["privacy.target_epsilon"] = eps
    cfg = load_config(None, [f"{k}={v}" for k, v in opts.items()])
    run_dir = work / f"{setting}-{method}-{eps}"
    t0 = time.perf_counter()
    with NormLog() as log:
        rows = run(cfg, run_dir, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    keep = ("round", "accuracy", "eval_loss", "epsilon", "accuracy_majority", "rejected")
    return {"setting": setting, "method": method, "target_epsilon": eps, "clip_norm": clip,
            "overrides": [f"{k}={v}" for k, v in opts.items()],
            "privacy": summary.get("privacy"), "rows": [{k: r[k] for k in keep if k in r}
                                                          for r in rows],
            "norms": log.norms, "summed_size": sorted(log.sizes), "noised_size": sorted(log.noised),
            "clipped": sum(n > clip for n in log.norms) / max(1, len(log.norms)),
            "wall_s": time.perf_counter() - t0, "loadavg_end": loadavg()}


def key(r: dict[str, Any]) -> str:
    return f"{r['setting']}/{r['method']}/{r['target_epsilon']}"


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(results: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    lines = ["# Client-level differential privacy: utility against epsilon (issue 14)", "",
             ("Written by `benchmarks/bench_privacy.py` (see its docstring for the method). Each "
             "method: one run with the privacy machinery on but no clipping and no noise "
             "(epsilon inf), whose median update norm becomes the clip norm C of the private "
             "runs; then one run per target epsilon (delta 1e-5, central noise, fedtune's "
             "fixed-size sampling without replacement, replace-one neighbours; the accountant "
             "is dp-accounting's RDP). *noise/mean* is the noise's std per coordinate in the "
             "released mean, `noise_multiplier x C / m`, as a multiple of C; *noise norm / C* "
             "multiplies it by the square root of the number of entries the noise covers (the "
             "space the method sums; for Ferret's reference mode the whole (seed, block) table): "
             "how far the noise alone moves the mean, against at most C for the signal."), ""]
    for setting, common in SETTINGS.items():
        rs = [r for r in results.values() if r["setting"] == setting]
        if not rs:
            continue
        over = [f"{k}={v}" for k, v in common.items()]
        maj = rs[0]["rows"][0].get("accuracy_majority")
        lines += [f"## {setting}", "", "Settings: `" + " ".join(over) + "`"
                  + (f"; majority label's share of the held-out set: {maj:.3f}" if maj else "")
                  + ".", "",
                  ("| method | target eps | eps reached | noise mult. | C | clipped | noised entries"
                  " | noise/mean (x C) | noise norm / C | metric by round (0 = before) | final |"
                  " run s | load at end |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        metric = "accuracy" if "accuracy" in rs[0]["rows"][-1] else "eval_loss"
        for r in sorted(rs, key=lambda r: (r["method"], -r["target_epsilon"])):
            p = r["privacy"] or {}
            nm, m = p.get("noise_multiplier", 0.0), p.get("clients_per_round", 1)
            size = max(r.get("noised_size") or r["summed_size"] or [0])
            clip = "none" if r["clip_norm"] >= NO_CLIP else f"{r['clip_norm']:.4g}"
            per = nm / m
            by_round = ", ".join(fmt(row.get(metric), ".3f") for row in r["rows"])
            lines.append(
                f"| {r['method']} | {r['target_epsilon']:g} | {fmt(p.get('epsilon'), '.3g')} | "
                f"{nm:.3g} | {clip} | {r['clipped']:.0%} | {size:,} | {per:.3g} | "
                f"{per * math.sqrt(size):.3g} | {by_round} | "
                f"{fmt(r['rows'][-1].get(metric), '.3f')} | {r['wall_s']:.0f} | "
                f"{r['loadavg_end'].split()[0]} |")
        opts = {}
        for r in sorted(rs, key=lambda r: r["method"]):
            own = [o for o in r["overrides"] if not o.startswith("privacy.")
                   and o not in {f"{k}={v}" for k, v in common.items()}]
            opts.setdefault(r["method"], " ".join(own))
        lines += ["", "Method options (besides the settings): " + "; ".join(
            f"{m}: `{o}`" for m, o in opts.items()) + "."]
        lines += ["", f"Metric: held-out {metric}. Median client update norm of the no-noise "
                  "run per method: " + "; ".join(
                      f"{r['method']} {statistics.median(r['norms']):.4g}" for r in rs
                      if r["clip_norm"] >= NO_CLIP and r["norms"]) + ".", ""]
    lines += ["## Findings", "", FINDINGS, ""]
    lines += [(f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, commit "
              f"{env['fedtune_commit']}; /proc/loadavg at the start of the last command "
              f"`{env['loadavg_start']}`."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=list(SETTINGS), default="minilm")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--eps", nargs="+", type=float, default=[math.inf, 16, 4, 1])
    p.add_argument("--set", nargs="*", default=[], help="extra key=value for every run")
    args = p.parse_args(argv)
    extra = dict(o.split("=", 1) for o in args.set)
    env = environment()
    env["loadavg_start"] = loadavg()
    results = json.loads(JSON.read_text())["results"] if JSON.exists() else {}
    def record(r: dict[str, Any]) -> None:  # every run is kept as soon as it ends
        results[key(r)] = r
        JSON.write_text(json.dumps({"environment": env, "results": results}, indent=1) + "\n")
        MD.write_text(render(results, env))

    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods or list(METHODS[args.setting]):
            base = run_one(args.setting, method, math.inf, NO_CLIP, Path(tmp), extra)
            record(base)
            clip = statistics.median(base["norms"])
            print(f"{method} eps inf: {base['rows'][-1]}, median norm {clip:.4g}", flush=True)
            for eps in (e for e in args.eps if not math.isinf(e)):
                r = run_one(args.setting, method, eps, clip, Path(tmp), extra)
                record(r)
                print(f"{method} eps {eps:g}: {r['rows'][-1]}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
