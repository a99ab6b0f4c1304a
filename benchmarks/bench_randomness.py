"""Shared randomness v3 against v2: fused add and projection throughput, one FedKSeed step.

CPU (default): the 134.5M float32 entries of SmolLM2-135M's trainable tensors, torch's thread
count (2 here), v2 (the mt19937 contract, loaded from git at its last commit) and v3 in the same
process, so the ratios are of one run. Then one FedKSeed in-place step (batch 1 x 256 tokens)
against two forward passes. GPU (``--device cuda``): 1.2e9 entries in float32 and bfloat16, the
fraction of the add's memory traffic (read and write every weight once) against the H200's
copy bandwidth, and the pinned digests recomputed on the device.

    flock /tmp/fedtune-bench.lock python benchmarks/bench_randomness.py
    python benchmarks/bench_randomness.py --device cuda --json $OUT/randomness_gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
from functools import partial
from pathlib import Path

import torch
from benchinfo import REPO, environment

V2_COMMIT = "8c798eb"
"""The last commit with randomness v2."""
H200_COPY_BYTES_S = 4.3e12
NOTES = "## Notes"


def load_v2() -> tuple[types.ModuleType, types.ModuleType]:
    """v2's randomness and projection modules, from git, under other names."""
    mods = []
    for name, path in (("randomness_v2", "src/fedtune/randomness.py"),
                       ("projection_v2", "src/fedtune/methods/projection.py")):
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{V2_COMMIT}:{path}"],
                             capture_output=True, text=True, check=True).stdout
        src = src.replace("from fedtune import randomness", "import randomness_v2 as randomness")
        spec = importlib.util.spec_from_loader(name, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(compile(src, f"{V2_COMMIT}:{path}", "exec"), mod.__dict__)  # noqa: S102
        mods.append(mod)
    return mods[0], mods[1]


def best(fn, reps: int) -> float:
    fn()  # warm up (compilation, page faults)
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def smollm2_tensors() -> list[torch.Tensor]:
    from fedtune.config import load_config
    from fedtune.methods.base import trainable_parameters
    from fedtune.models import load_model, load_tokenizer

    cfg = load_config(None, ["model.source=smollm2"])
    tok = load_tokenizer(cfg.model, classifier=False)
    model = load_model(cfg.model, classifier=False, seed=cfg.seed, tokenizer=tok)
    return [p.detach() for p in trainable_parameters(model).values()], model, cfg


def cpu_throughput(params: list[torch.Tensor], reps: int) -> list[dict]:
    from fedtune import randomness as R
    from fedtune.methods import projection as P

    v2, p2 = load_v2()
    n = sum(p.numel() for p in params)
    rows = [{"what": "in-place add (t += 1), the ceiling", "dist": "-",
             "v3": n / best(lambda: [p.add_(0.0) for p in params], reps)}]
    for dist in ("rademacher", "gaussian"):
        for terms in (1, 8):
            seeds = [(s, 1e-12) for s in range(terms)]
            rows.append({
                "what": f"fused add, {terms} seed(s), model tensors", "dist": dist,
                "v2": n * terms / best(partial(v2.add_directions_, params, seeds, dist), reps),
                "v3": n * terms / best(partial(R.add_directions_, params, seeds, dist), reps)})
    # Ferret's kernels: one basis per block (greedy grouping), projection and reconstruction
    groups = P.block_groups([p.numel() for p in params])
    blocks = [[params[i] for i in g] for g in groups]
    flats = [torch.cat([t.view(-1) for t in b]) for b in blocks]
    def v2_project(dist):
        for j, f in enumerate(flats):
            p2.project(f, j, 1, dist)

    def v3_project(dist):
        for j, b in enumerate(blocks):
            P.project([t.view(-1) for t in b], [(j, 0)], dist, flats[j].numel())

    def v2_rebuild(dist):
        for j, f in enumerate(flats):
            p2.reconstruct_(f, j, [1e-12], dist)

    def v3_rebuild(dist):
        for j, b in enumerate(blocks):
            P.apply_(b, [(j, 0, 1e-12)], dist, flats[j].numel())

    for dist in ("truncnormal", "gaussian", "rademacher"):
        rows.append({"what": "projection <v, Delta>, 1 basis per block", "dist": dist,
                     "v2": n / best(partial(v2_project, dist), reps),
                     "v3": n / best(partial(v3_project, dist), reps)})
        rows.append({"what": "reconstruction w += c v, 1 basis per block", "dist": dist,
                     "v2": n / best(partial(v2_rebuild, dist), reps),
                     "v3": n / best(partial(v3_rebuild, dist), reps)})
    return rows


def fedkseed_step(model, cfg, reps: int) -> list[dict]:
    from fedtune.methods.base import trainable_parameters
    from fedtune.methods.zo import ZOStepper
    from fedtune.models import load_tokenizer
    from fedtune.tasks import CausalLMTask

    tok = load_tokenizer(cfg.model, classifier=False)
    ids = torch.randint(0, len(tok), (1, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    task = CausalLMTask(tok)
    params = list(trainable_parameters(model).values())

    def fwd():
        with torch.no_grad():
            return task.loss(model, batch)

    rows = []
    two_fwd = 2 * statistics.median([best(fwd, 1) for _ in range(reps)])
    for mode in ("inplace", "onthefly"):
        for dist in ("rademacher", "gaussian"):
            stepper = ZOStepper(params, 5e-4, 1e-12, dist, mode, model)
            step = statistics.median([best(partial(stepper.step, 1, fwd), 1)
                                      for _ in range(reps)])
            rows.append({"mode": mode, "dist": dist, "two_forward_s": two_fwd, "step_s": step,
                         "ratio": step / two_fwd})
    return rows


def device_throughput(n: int, reps: int, device: str) -> list[dict]:
    from fedtune import randomness as R

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.zeros(n, dtype=dtype, device=device)
        traffic = 2 * t.element_size() * n
        copy = best(partial(t.add_, 0), reps)
        rows.append({"what": "in-place add (t += 0)", "dtype": str(dtype), "dist": "-",
                     "entries_s": n / copy, "bandwidth_fraction": traffic / copy
                     / H200_COPY_BYTES_S})
        for dist in ("rademacher", "gaussian", "truncnormal"):
            bound = 1e-4 if dist == "truncnormal" else None
            s = best(partial(R.add_streams_, t, [(1, 0, 1e-12)], dist, bound), reps)
            rows.append({"what": "fused add, 1 seed", "dtype": str(dtype), "dist": dist,
                         "entries_s": n / s,
                         "bandwidth_fraction": traffic / s / H200_COPY_BYTES_S})
            if dtype == torch.float32:
                s = best(partial(R.dot_streams, t, [(1, 0)], dist, bound), reps)
                rows.append({"what": "projection, 1 basis", "dtype": str(dtype), "dist": dist,
                             "entries_s": n / s, "bandwidth_fraction": t.element_size() * n / s
                             / H200_COPY_BYTES_S})
        del t
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows


def markdown_cpu(rows, steps, env) -> str:
    out = ["# Shared randomness v3 (Philox4x32-10) against v2 (mt19937)", "",
           ("Written by `benchmarks/bench_randomness.py` (command, machine and load below). "
            "Entries per second; 'x' is v3 over v2 in the same run."), "",
           (f"## CPU: {env['torch_threads']} threads, {env['n_entries']:,} float32 entries "
            "(SmolLM2-135M's trainable tensors)"), "",
           "| kernel | distribution | v2 (M/s) | v3 (M/s) | x |", "|---|---|---|---|---|"]
    for r in rows:
        v2 = r.get("v2")
        out.append(f"| {r['what']} | {r['dist']} | {v2 / 1e6:,.0f} | {r['v3'] / 1e6:,.0f} | "
                   f"{r['v3'] / v2:.2f} |" if v2 else
                   f"| {r['what']} | {r['dist']} | - | {r['v3'] / 1e6:,.0f} | - |")
    out += ["", "## One FedKSeed in-place step on SmolLM2-135M (batch 1 x 256 tokens)", "",
            "| mode | distribution | 2 forward passes (s) | step (s) | step / 2 forward |",
            "|---|---|---|---|---|"]
    out += [f"| {s['mode']} | {s['dist']} | {s['two_forward_s']:.3f} | {s['step_s']:.3f} | "
            f"{s['ratio']:.2f} |" for s in steps]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--entries", type=int, default=1_200_000_000, help="GPU tensor size")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--kernels", action="store_true",
                    help="the device table (what --device cuda prints) on --device itself")
    args = ap.parse_args()
    env = environment()
    if args.device == "cuda" or args.kernels:
        from fedtune import randomness as R
        from fedtune.kernels import spec

        digests = {d: R.digest(d, device=args.device) == spec.DIGESTS[d]
                   for d in R.DISTRIBUTIONS}
        print(f"{args.device} digests equal the pinned ones:", digests, flush=True)
        rows = device_throughput(args.entries, args.reps, args.device)
        for r in rows:
            print(f"{r['what']:<24} {r['dtype']:<15} {r['dist']:<12} "
                  f"{r['entries_s'] / 1e9:8.1f} G/s  {100 * r['bandwidth_fraction']:5.1f}% of "
                  "4.3 TB/s", flush=True)
        name = torch.cuda.get_device_name() if args.device == "cuda" else env["cpu"]
        result = {"env": env, "device": name, "digests": digests, "rows": rows}
    else:
        params, model, cfg = smollm2_tensors()
        env["n_entries"] = sum(p.numel() for p in params)
        rows = cpu_throughput(params, args.reps)
        steps = fedkseed_step(model, cfg, args.reps)
        text = markdown_cpu(rows, steps, env)
        text += (f"\n\n_Command:_ `python benchmarks/bench_randomness.py`  \n_Machine:_ "
                 f"{env['cpu']}, {env['cores']} cores, 1-min load average at start "
                 f"{env['load_avg_at_start']}, torch {env['torch']}, git "
                 f"{env['fedtune_commit']}\n")
        print(text)
        md = REPO / "benchmarks" / "randomness.md"
        old = md.read_text() if md.exists() else ""
        notes = old[old.index(NOTES):] if NOTES in old else ""  # hand-written, kept
        md.write_text(text + ("\n" + notes if notes else ""))
        result = {"env": env, "rows": rows, "fedkseed_step": steps}
    out = args.json or REPO / "benchmarks" / f"randomness_{args.device}.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
