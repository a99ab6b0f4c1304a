"""Byzantine-robust aggregation (``federation.aggregator``) on a federation that learns: FeDeRA
on MiniLM / Rotten Tomatoes classification (the setting of ``demo_trials.md`` d1, with 10 iid
clients all sampled every round), with 0, 1 or 3 of the 10 clients hostile, mean against
median. Final held-out accuracy and evaluation loss per run.

The hostile clients train honestly, then rewrite their upload through FeDeRA's own codec
(``tests/hostile.py``, the helper the tests use): 1 hostile = its adapter update scaled by
1e3; 3 hostile = one scaled by 1e3, one sign-flipped, one replaced by noise 1e3 times its
size. A run whose clients all diverge stops (``federation.min_clients``); it is reported with
the rounds it completed. Results go to ``benchmarks/robust.json`` and ``benchmarks/robust.md``::

    flock /tmp/fedtune-bench.lock python benchmarks/bench_robust.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchinfo import REPO, environment

from fedtune import experiment as ex
from fedtune.config import load_config
from fedtune.engines.inprocess import LocalTransport
from fedtune.engines.rounds import Progress, federate

sys.path.insert(0, str(REPO))
from tests import hostile  # the test helper, outside the library on purpose

HERE = Path(__file__).resolve().parent
COMMON = {
    "model.source": "minilm", "data.source": "rotten_tomatoes", "data.task": "classification",
    "data.max_length": 48, "eval.max_examples": 200, "eval.batch_size": 100,
    "output.save_model": False, "partition.scheme": "iid", "partition.num_clients": 10,
    "federation.clients_per_round": 1.0, "federation.rounds": 3,
    "method.name": "federa", "method.rank": 16, "method.alpha": 32,
    "train.optimizer": "adamw", "train.lr": 1e-3, "train.local_steps": 10,
    "train.batch_size": 16,
}
HOSTILE = {0: {}, 1: {1: hostile.scaled},
           3: {1: hostile.scaled, 4: hostile.flipped, 7: hostile.noise}}
KINDS = {hostile.scaled: "x1e3", hostile.flipped: "sign-flipped", hostile.noise: "noise x1e3"}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def run_one(aggregator: str, attacks: dict, workdir: Path) -> dict[str, Any]:
    cfg = load_config(None, [f"{k}={v}" for k, v in
                             {**COMMON, "federation.aggregator": aggregator}.items()])
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    hostile.make_hostile(client, server, hostile.WeightsSpace(32, deltas=False), attacks, [])
    run_dir = workdir / f"{aggregator}-{len(attacks)}"
    t0 = time.perf_counter()
    stopped = None
    try:
        federate(exp, server, client, LocalTransport(exp, client, Progress(False)), run_dir,
                 out=Progress(False))
    except RuntimeError as e:  # every client diverged: too few acceptable uploads
        stopped = str(e)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("round", "accuracy", "eval_loss", "rejected", "accuracy_majority")
    return {"aggregator": aggregator, "hostile": len(attacks),
            "attacks": {str(c): KINDS[a] for c, a in attacks.items()},
            "rows": [{k: r[k] for k in keep if k in r} for r in rows],
            "stopped": stopped, "wall_s": time.perf_counter() - t0}


def cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(results: list[dict[str, Any]]) -> str:
    lines = [("| hostile of 10 | aggregator | accuracy by round (0 = before) | final accuracy "
              "| final eval loss | rejected uploads | run |"),
             "|---|---|---|---|---|---|---|"]
    for r in results:
        accs = ", ".join(cell(row.get("accuracy"), ".3f") for row in r["rows"])
        last = r["rows"][-1]
        rejected = sum(len(row.get("rejected", [])) for row in r["rows"][1:])
        status = (f"stopped after round {last['round']}" if r["stopped"]
                  else f"{r['wall_s']:.0f} s")
        lines.append(f"| {r['hostile']} | {r['aggregator']} | {accs} | "
                     f"{cell(last.get('accuracy'), '.3f')} | {cell(last.get('eval_loss'), '.4g')}"
                     f" | {rejected} | {status} |")
    return "\n".join(lines)


def majority(results: list[dict[str, Any]]) -> str:
    return cell(results[0]["rows"][0].get("accuracy_majority"), ".3f")


def main() -> None:
    env = environment()
    env["loadavg_start"] = loadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for h, attacks in HOSTILE.items():
            for aggregator in ("mean", "median"):
                r = run_one(aggregator, attacks, Path(tmp))
                print(f"{h} hostile, {aggregator}: "
                      + ", ".join(cell(row.get("accuracy"), ".3f") for row in r["rows"])
                      + (f"  (stopped: {r['stopped']})" if r["stopped"] else ""), flush=True)
                results.append(r)
    env["loadavg_end"] = loadavg()
    (HERE / "robust.json").write_text(json.dumps({"environment": env, "config": COMMON,
                                                  "results": results}, indent=1) + "\n")
    args = " ".join(f"{k}={v}" for k, v in COMMON.items())
    (HERE / "robust.md").write_text(
        "# Byzantine-robust aggregation: mean against median (issue 14)\n\n"
        "`flock /tmp/fedtune-bench.lock python benchmarks/bench_robust.py` (in-process engine), "
        f"each run `{args}` with `federation.aggregator` mean or median. Held-out accuracy on "
        f"{COMMON['eval.max_examples']} examples (the majority label's share of them: "
        f"{majority(results)}). Hostile clients train honestly and then "
        "rewrite their upload (tests/hostile.py): 1 hostile = client 1 sends its update x1e3; "
        "3 hostile = client 1 x1e3, client 4 sign-flipped, client 7 noise 1e3 times the "
        "update's size.\n\n"
        + table(results) + "\n\n"
        f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, commit "
        f"{env['fedtune_commit']}; /proc/loadavg at start `{env['loadavg_start']}`, at end "
        f"`{env['loadavg_end']}` (other jobs share the machine).\n")


if __name__ == "__main__":
    main()
