"""Ferret on SmolLM2-135M: bytes on the wire, projection/reconstruction throughput against the
raw generation rate, per-phase round times, and accuracy against FedAvg and FedKSeed on the
Natural Instructions subset at equal rounds.

Parts (each writes its section of ``benchmarks/ferret.json``; ``report`` renders
``benchmarks/ferret.md`` from it, and every part re-renders it)::

    flock /tmp/fedtune-bench.lock python benchmarks/bench_ferret.py --part throughput
    flock /tmp/fedtune-bench.lock python benchmarks/bench_ferret.py --part accuracy --methods ferret
    flock /tmp/fedtune-bench.lock python benchmarks/bench_ferret.py --part accuracy --methods fedavg
    flock /tmp/fedtune-bench.lock python benchmarks/bench_ferret.py --part accuracy \
        --methods fedkseed

``throughput`` trains one client for a few steps to get a real update Delta, then times the
client's projection (``FerretClient.project``) and one reconstruction of that upload
(``Mode.apply``) for each basis distribution, and the generator's own rate filling a
preallocated tensor with the same distribution. ``accuracy`` runs the in-process engine
(``fedtune.engines.inprocess.run``) with identical data, clients, rounds and local steps for
each method and keeps its per-round metrics (eval loss, bytes, phase times) and the final
Rouge-L (``rouge-score``, greedy generations).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchinfo import environment

from fedtune import randomness, wire
from fedtune.config import load_config
from fedtune.methods import projection
from fedtune.methods.base import FitContext, trainable_state

HERE = Path(__file__).resolve().parent
JSON = HERE / "ferret.json"
MD = HERE / "ferret.md"
NI_PATH = "/work/shared/data/natural-instructions"

# The shared experiment of the accuracy part (sized for ~5 min per method on 2 shared cores).
COMMON = {
    "seed": 0,
    "model.source": "smollm2",
    "data.source": "natural_instructions",
    "data.path": NI_PATH,
    "data.task": "instruction",
    "data.max_length": 128,
    "partition.scheme": "task",
    "federation.rounds": 5,
    "federation.clients_per_round": 0.0625,  # 3 of the 48 training tasks per round
    "federation.weighting": "examples",
    "train.optimizer": "sgd",
    "train.lr": 0.002,
    "train.local_steps": 3,
    "train.batch_size": 2,
    "eval.max_examples": 32,
    "eval.batch_size": 16,
    "eval.generate_examples": 16,
    "eval.max_new_tokens": 32,
    "eval.generate_every": 0,
    "output.save_model": False,
}
METHODS = {
    "ferret": {"method.name": "ferret", "method.k": 512, "method.distribution": "truncnormal"},
    "fedavg": {"method.name": "fedavg"},
    "fedkseed": {"method.name": "fedkseed"},
    # 4x the coordinates at about the default's generation time (random bits are ~4x cheaper)
    "ferret-k2048-rademacher": {"method.name": "ferret", "method.k": 2048,
                                "method.distribution": "rademacher"},
    # the authors' code and settings: shared pool of 200 seeds, their allocation, server_lr 10,
    # clip 10; local work lr 1e-4, 10 steps of 4 samples (batch 1, 4 accumulated); one round
    "ferret-reference-authors": {"method.name": "ferret", "method.mode": "reference",
                                 "method.server_lr": 10, "method.clip_norm": 10,
                                 "train.lr": 1e-4, "train.local_steps": 10,
                                 "train.batch_size": 1, "train.grad_accum": 4,
                                 "federation.rounds": 1},
}


def overrides(extra: dict[str, Any]) -> list[str]:
    items = {**COMMON, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def load_results() -> dict[str, Any]:
    return json.loads(JSON.read_text()) if JSON.exists() else {}


def save_results(res: dict[str, Any]) -> None:
    JSON.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    MD.write_text(render(res))


def machine() -> dict[str, Any]:
    return environment()


# --- throughput ----------------------------------------------------------------------------------


def raw_rate(dist: str) -> dict[str, float]:
    """Entries per second of ``randomness.fill_`` into a preallocated tensor, for one torch
    thread and for the process's default, into a segment-sized (in cache) and a 4M-entry
    tensor; the fraction is taken against the best of these (the most demanding reference)."""
    bound = projection.bound_for(dist, 1_000_000)
    threads = torch.get_num_threads()
    rates = {}
    for nt in sorted({1, threads}):
        torch.set_num_threads(nt)
        try:
            for n in (1 << 16, 1 << 22):
                buf = torch.empty(n)
                reps = max(4, (1 << 25) // n)
                randomness.fill_(buf, 1, dist, bound)
                t0 = time.perf_counter()
                for _ in range(reps):
                    randomness.fill_(buf, 1, dist, bound)
                rates[f"{nt} thread(s), {n} entries"] = n * reps / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
    return rates


def torch_rates(n: int = 1 << 22, reps: int = 6) -> dict[str, float]:
    buf = torch.empty(n)
    out = {}
    for name, fn in [("torch normal_", lambda: buf.normal_()),
                     ("torch trunc_normal_", lambda: torch.nn.init.trunc_normal_(
                         buf, a=-1e-3, b=1e-3))]:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = n * reps / (time.perf_counter() - t0)
    return out


def throughput(args) -> dict[str, Any]:
    from fedtune import experiment as ex
    from fedtune.methods.fedavg import METHOD as FEDAVG
    from fedtune.methods.fedavg import Config as FedAvgConfig
    from fedtune.methods.ferret import (
        Config,
        FerretClient,
        decode_upload_body,
        encode_upload_body,
        make_mode,
    )
    from fedtune.methods.training import local_train

    cfg = load_config(None, overrides({**METHODS["ferret"], "method.k": args.k}))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    w0 = trainable_state(model)
    params = list(w0)
    client_data = exp.clients[0]
    ctx = FitContext(round=0, client_id=0, seed=ex.client_seed(cfg, 0, 0), train=cfg.train,
                     task=exp.task)
    t0 = time.perf_counter()
    local_train(model, client_data, ctx)
    train_s = time.perf_counter() - t0
    snapshot = [w0[n] for n in params]
    out: dict[str, Any] = {"k": args.k, "local_steps": cfg.train.local_steps,
                           "batch_size": cfg.train.batch_size, "train_s": train_s, "dists": {}}
    for dist in args.dists:
        mcfg = Config(k=args.k, distribution=dist)
        client = FerretClient(mcfg, model, cfg.seed)
        t0 = time.perf_counter()
        counts, coords = client.project(snapshot, seed=12345)
        project_s = time.perf_counter() - t0
        numbers = client.last_projection["numbers"]
        body = encode_upload_body(mcfg, client.layout, 12345, counts, coords)
        half = encode_upload_body(Config(k=args.k, distribution=dist, wire_dtype="float16"),
                                  client.layout, 12345, counts, coords)
        decode_upload_body(mcfg, client.layout, body)
        import struct

        record = struct.pack("<BdH", 0, 1.0, 1) + struct.pack("<dI", 1.0, len(body)) + body
        rebuilt = [t.clone() for t in snapshot]
        reb = make_mode(mcfg, client.layout, cfg.seed)
        t0 = time.perf_counter()
        reb.apply(rebuilt, record)
        rebuild_s = time.perf_counter() - t0
        # how far one client's reconstruction is from its Delta (the price of K << d)
        err = dnorm = wnorm = 0.0
        local = dict(client.params)
        for name, s0, rb in zip(params, snapshot, rebuilt):
            true = s0 - local[name].detach()
            err += float(((s0 - rb) - true).double().norm() ** 2)
            dnorm += float(true.double().norm() ** 2)
            wnorm += float(s0.double().norm() ** 2)
        rates = raw_rate(dist)
        raw = max(rates.values())
        out["dists"][dist] = {
            "numbers": numbers, "project_s": project_s, "reconstruct_s": rebuild_s,
            "raw_rate": raw, "project_rate": numbers / project_s,
            "reconstruct_rate": numbers / rebuild_s,
            "project_fraction": numbers / project_s / raw,
            "reconstruct_fraction": numbers / rebuild_s / raw,
            "upload_bytes": wire.HEADER_SIZE + len(body),
            "upload_bytes_fp16": wire.HEADER_SIZE + len(half), "raw_rates": rates,
            "delta_norm": dnorm ** 0.5, "error_norm": err ** 0.5,
            "relative_error": (err / dnorm) ** 0.5, "weights_norm": wnorm ** 0.5,
        }
        print(dist, json.dumps(out["dists"][dist]), flush=True)
        del rebuilt
    layout = FerretClient(Config(k=args.k), model, cfg.seed).layout
    out["blocks"] = len(layout)
    out["d"] = sum(layout.sizes)
    out["largest_block"] = max(layout.sizes)
    out["counts_max"] = max(counts)
    out["min_numbers"] = 2 * sum(layout.sizes)
    fedavg = FEDAVG.make_server(FedAvgConfig(), w0, 0, "examples")
    out["fedavg_bytes"] = len(fedavg.download(0, None))
    out.update({f"rate {k}": v for k, v in torch_rates().items()})
    return out


# --- accuracy ------------------------------------------------------------------------------------


def variant(name: str) -> dict[str, Any]:
    """A named entry of METHODS, or ``base:key=value,...`` for a sweep point: ``base`` a METHODS
    entry, a key without a dot a ``method.`` option, a dotted key any config key (for example
    ``ferret:k=8192,distribution=rademacher,federation.clients_per_round=0.125``)."""
    base, _, opts = name.partition(":")
    extra = dict(METHODS[base])
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        extra[key if "." in key else f"method.{key}"] = value
    return extra


def accuracy(method: str) -> dict[str, Any]:
    from fedtune.engines.inprocess import run

    over = overrides(variant(method))
    cfg = load_config(None, over)
    t0 = time.perf_counter()
    out_dir = Path("/tmp") / f"bench-ferret-{os.getpid()}-{len(method)}"
    rows = run(cfg, out_dir, progress=True)
    return {"overrides": over, "rows": rows, "wall_s": time.perf_counter() - t0,
            "method_options": {k: v for k, v in vars(cfg.method_config()).items()}}


def allocation(args) -> dict[str, Any]:
    """Predicted reconstruction error of each allocation rule on real updates: the Deltas of
    round 0's sampled clients (accuracy settings), the error ``sqrt(sum_l d_l ||Delta_l||^2 /
    K_l) / ||Delta||`` from ``PaperMode.allocate``'s counts (no bases generated), and the random
    numbers ``sum_l K_l d_l`` each choice costs to project and to rebuild."""
    import math

    from fedtune import experiment as ex
    from fedtune.methods.ferret import Config, Layout, PaperMode
    from fedtune.methods.training import local_train

    cfg = load_config(None, overrides(METHODS["ferret"]))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    w0 = trainable_state(model)
    layout = Layout(Config(), [(n, t.shape) for n, t in w0.items()])
    points = [("norm", 4096), ("sqrt_size", 4096), ("norm", 16384)]
    clients = []
    for cid in ex.sample_clients(cfg, 0, list(range(len(exp.clients)))):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in w0:
                    p.copy_(w0[n])
        local_train(model, exp.clients[cid], FitContext(
            round=0, client_id=cid, seed=ex.client_seed(cfg, 0, cid), train=cfg.train,
            task=exp.task))
        now = dict(model.named_parameters())
        names = layout.names
        norms = [math.sqrt(sum(float((w0[names[i]] - now[names[i]].detach()).double().norm() ** 2)
                               for i in group)) for group in layout.groups]
        total = sum(n * n for n in norms)
        out = {"client": cid, "embedding_share": norms[0] ** 2 / total}
        for rule, k in points:
            # sqrt_size: K_l ~ sqrt(d_l) ||Delta_l||, the least error for the coordinates sent
            weights = norms if rule == "norm" else [
                math.sqrt(d) * n for d, n in zip(layout.sizes, norms)]
            counts = PaperMode(Config(k=k), layout, cfg.seed).allocate(weights)
            err = sum(d * n * n / c for d, n, c in zip(layout.sizes, norms, counts))
            out[f"{rule}@{k}"] = {"relative_error": math.sqrt(err / total),
                                  "numbers": sum(c * d for c, d in zip(counts, layout.sizes)),
                                  "largest_block_bases": counts[layout.sizes.index(
                                      max(layout.sizes))]}
        clients.append(out)
        print(json.dumps(out), flush=True)
    return {"clients": clients, "blocks": len(layout), "largest_block": max(layout.sizes),
            "median_block": sorted(layout.sizes)[len(layout) // 2]}


def _allocation_section(al: dict[str, Any]) -> list[str]:
    keys = [k for k in al["clients"][0] if "@" in k]
    lines = ["## Allocation rules on real updates", "",
             f"Command: `{al['command']}` (load average {al['machine']['load_avg_at_start']}).",
             "", (f"SmolLM2-135M, {al['blocks']} blocks (largest {al['largest_block']:,}: the "
             f"embedding; median {al['median_block']:,}). Each of round 0's sampled clients "
             "trains as in the accuracy runs; for each rule and k, `PaperMode.allocate` gives "
             "the counts K_l and the predicted relative reconstruction error "
             "sqrt(sum_l d_l ||Delta_l||^2 / K_l) / ||Delta|| (what one client's "
             "reconstruction is off by; no bases generated), with the random numbers "
             "sum_l K_l d_l it costs to project (and again to rebuild)."), "",
             "| client | embedding share of ‖Δ‖² | " + " | ".join(
                 f"{k} error | {k} numbers (G) | {k} bases on the embedding" for k in keys) + " |",
             "|---|---|" + "---|---|---|" * len(keys)]
    for c in al["clients"]:
        lines.append(f"| {c['client']} | {c['embedding_share']:.2f} | " + " | ".join(
            f"{c[k]['relative_error']:.0f} | {c[k]['numbers'] / 1e9:.1f} | "
            f"{c[k]['largest_block_bases']}" for k in keys) + " |")
    lines += ["", ("norm (the paper's rule) is the least error for the numbers generated; "
              "sqrt_size the least for the coordinates sent. At equal generation cost the norm "
              "rule with more coordinates beats sqrt_size (compare the columns of equal "
              "numbers)."), ""]
    return lines


# --- report --------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def render(res: dict[str, Any]) -> str:
    lines = ["# Ferret benchmark (SmolLM2-135M, Natural Instructions subset)", "",
             ("Written by `benchmarks/bench_ferret.py`; numbers come from the encoded messages and "
             "wall-clock timers on this machine (2 CPU cores shared with other jobs: the load "
             "average is recorded with each part)."), ""]
    tp = res.get("throughput")
    if tp:
        m = tp["machine"]
        lines += [
            "## Throughput and bytes", "",
            f"Command: `{tp['command']}`  ", (f"Machine: {m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']} ({m['torch_threads']} threads), transformers "
            f"{m['transformers']}, Python {m['python']}, fedtune {m['fedtune_commit']}, "
            f"randomness v{m['randomness_version']}, load average {m['load_avg_at_start']}."), "",
            (f"SmolLM2-135M: d = {tp['d']:,} trainable parameters in {tp['blocks']} blocks "
            f"(reference greedy grouping; largest block {tp['largest_block']:,}). Delta from "
            f"{tp['local_steps']} SGD steps on one client. K = {tp['k']} coordinates: "
            f"generating sum_l K_l d_l numbers per projection (the floor, 2 bases per "
            f"block, is {tp['min_numbers']:,})."), "",
            ("| bases | numbers generated | projection s | reconstruction s | raw fill rate "
            "(best, M/s) | projection / raw | reconstruction / raw | upload B (fp32) | upload B "
            "(fp16) | ‖Δ~-Δ‖/‖Δ‖ |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
        for dist, r in tp["dists"].items():
            lines.append(
                f"| {dist} | {r['numbers']:,.0f} | {r['project_s']:.2f} | "
                f"{r['reconstruct_s']:.2f} | {r['raw_rate'] / 1e6:.0f} | "
                f"{r['project_fraction']:.2f} | {r['reconstruct_fraction']:.2f} | "
                f"{r['upload_bytes']:,} | {r['upload_bytes_fp16']:,} | "
                f"{r.get('relative_error', float('nan')):.0f} |")
        rates = ", ".join(f"{k[5:]} {v / 1e6:.0f} M/s" for k, v in tp.items()
                          if k.startswith("rate "))
        up = next(iter(tp["dists"].values()))["upload_bytes"]
        lines += ["", ("Raw fill rate: `randomness.fill_` of the same distribution into a "
                  "preallocated tensor, the best of {1, default} torch threads x {one segment "
                  "(64K, 256K for rademacher), 4M entries}; projection / raw and "
                  "reconstruction / raw are numbers generated per second of "
                  "`FerretClient.project` and `Mode.apply` divided by it. ‖Δ~-Δ‖/‖Δ‖: one client's reconstruction error relative to "
                  "its update (unbiased, but with K << d the variance is large: about "
                  "sqrt(d_l / K_l) per block)."),
                  "", (f"For reference, on this machine now: {rates} (preallocated 4M-entry "
                  "tensor). FedAvg sends the full weights: "
                  f"{tp['fedavg_bytes']:,} B per message, {tp['fedavg_bytes'] / up:,.0f}x "
                  f"Ferret's fp32 upload."), ""]
    groups: dict[tuple, dict[str, Any]] = {}
    for name, r in res.get("accuracy", {}).items():
        key = tuple(o for o in r["overrides"] if not o.startswith("method."))
        groups.setdefault(key, {})[name] = r
    for n, acc in enumerate(groups.values()):
        lines += _accuracy_section(acc, "Accuracy at equal rounds" if n == 0
                                   else f"Accuracy at equal rounds, other settings ({n})")
    if res.get("allocation"):
        lines += _allocation_section(res["allocation"])
    if res.get("notes"):
        lines += ["## Findings", "", res["notes"], ""]
    return "\n".join(lines)


def _accuracy_section(acc: dict[str, Any], title: str) -> list[str]:
    lines: list[str] = []
    if acc:
        any_run = next(iter(acc.values()))
        lines += [f"## {title}", "",
                  "Same data, partition (one client per training task), sampled clients, local "
                  "steps and evaluation for every method; in-process engine. Settings: `"
                  + " ".join(o for o in any_run["overrides"] if not o.startswith("method."))
                  + "`. Commands: "
                  + "; ".join(dict.fromkeys(f"`{r['command']}`" for r in acc.values())) + ".",
                  "", "Method options (each method's defaults unless set in the command): "
                  + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in
                                                       r.get("method_options", {}).items())
                              for name, r in acc.items()) + ".", "",
                  "Evaluation loss on held-out tasks after each round:", "",
                  "| method | " + " | ".join(f"r{r['round']}" for r in any_run["rows"])
                  + " | Rouge-L before | Rouge-L after |",
                  "|---|" + "---|" * (len(any_run["rows"]) + 2)]
        for name, r in acc.items():
            rows = r["rows"]
            lines.append(f"| {name} | " + " | ".join(_fmt(x.get("eval_loss")) for x in rows)
                         + f" | {_fmt(rows[0].get('rouge_l'))} | {_fmt(rows[-1].get('rouge_l'))} |")
        lines += ["", ("Rouge-L: F-measure of `rouge-score` (default tokenizer) on greedy "
                  "generations; see the settings for the number of examples and new tokens."), "",
                  "Per round, mean over rounds (seconds; bytes per client per message):", "",
                  ("| method | up B | down B | up vs FedAvg | train | project | encode | server "
                  "aggregate (reconstruct) | client apply | round | load avg |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        fedavg_up = None
        if "fedavg" in acc:
            fedavg_up = _mean(acc["fedavg"]["rows"][1:], "bytes_up_per_client")
        for name, r in acc.items():
            rows = r["rows"][1:]
            up = _mean(rows, "bytes_up_per_client")
            ratio = f"1/{fedavg_up / up:,.0f}" if fedavg_up and up else "-"
            srv = _mean(rows, "method_server_reconstruct_s")
            agg = _fmt(_mean(rows, "time_aggregate"), ".1f")
            if srv is not None:
                agg += f" ({srv:.1f})"
            lines.append(
                f"| {name} | {_fmt(up, ',.0f')} | "
                f"{_fmt(_mean(rows, 'bytes_down_per_client'), ',.0f')}"
                f" | {ratio} | {_fmt(_mean(rows, 'time_train'), '.1f')} | "
                f"{_fmt(_mean(rows, 'time_project'), '.1f')} | "
                f"{_fmt(_mean(rows, 'time_encode'), '.2f')} | {agg} | "
                f"{_fmt(_mean(rows, 'time_apply'), '.1f')} | "
                f"{_fmt(_mean(rows, 'time_round'), '.1f')} | {r['machine']['load_avg_at_start']} |")
        lines += ["", ("Phase times are summed over the round's clients (train, project, encode) "
                  "or taken once (server aggregate, which includes the server's reconstruction "
                  "for Ferret; client apply = the client half's sync to the new global model, "
                  "i.e. the client reconstruction for Ferret and FedKSeed). Ferret's download "
                  "carries every participating client's upload for each missing round, so it "
                  "grows with the rounds a client was away."), ""]
    return lines


def _method_names(items: list[str]) -> list[str]:
    """``fedavg,ferret`` lists entries; an item with ``:`` is one sweep point (its commas
    separate options)."""
    return [m for item in items for m in ([item] if ":" in item else item.split(","))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["throughput", "accuracy", "allocation", "report"], required=True)
    p.add_argument("--methods", nargs="+", default=["ferret,fedavg,fedkseed"],
                   help="METHODS entries, comma-separated, or sweep points base:key=value,...")
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--dists", default="truncnormal,gaussian,rademacher")
    args = p.parse_args(argv)
    args.dists = args.dists.split(",")
    command = "flock /tmp/fedtune-bench.lock python benchmarks/bench_ferret.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    res = load_results()
    if args.part == "throughput":
        out = throughput(args)
        out.update(machine=machine(), command=command)
        res["throughput"] = out
        save_results(res)
    elif args.part == "allocation":
        out = allocation(args)
        out.update(machine=machine(), command=command)
        res["allocation"] = out
        save_results(res)
    elif args.part == "accuracy":
        for method in _method_names(args.methods):
            mach = machine()
            out = accuracy(method)
            out.update(machine=mach, command=command)
            res = load_results()
            res.setdefault("accuracy", {})[method] = out
            save_results(res)
    else:
        save_results(res)
    print(MD.read_text())


if __name__ == "__main__":
    main()
