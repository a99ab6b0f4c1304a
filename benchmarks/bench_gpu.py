"""Every method's round on one device at real shapes: seconds per phase, bytes, peak memory.

A randomly initialised model of a real architecture (``benchmarks/configs/*.json``; weights
are not needed to time or size anything) on ``--device`` in ``--dtype``, batches of 1 x
``--tokens`` random tokens, ``--clients`` clients per round, ``--rounds`` rounds (the last one
is reported: the first pays for compilation and allocation). The method halves are driven as
the round loop drives them (download, sync, fit, aggregate), each phase timed with the device
synchronised. Peak memory is ``torch.cuda.max_memory_allocated`` during one client's sync and
fit, against a plain inference pass of the same model and batch (GPU only).

    python benchmarks/bench_gpu.py --config benchmarks/configs/llama-3.2-1b.json \
        --device cuda --dtype bfloat16 --json $OUT/gpu.json
    python benchmarks/bench_gpu.py --config smollm2 --device cpu --fedkseed-steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from functools import partial
from pathlib import Path

import torch
from benchinfo import REPO, environment

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RandomTokens:
    """Next-token loss on random token sequences (enough for real gradients and ZO losses)."""

    def __init__(self, vocab: int, tokens: int, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.examples = [{"ids": torch.randint(0, vocab, (tokens,), generator=g)}
                         for _ in range(n)]

    @staticmethod
    def collate(examples):
        return torch.stack([e["ids"] for e in examples])

    @staticmethod
    def loss(model, batch):
        batch = batch.to(next(model.parameters()).device)
        logits = model(input_ids=batch).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(config: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from fedtune.models import model_from_config, smollm2_folder

    path = smollm2_folder() / "config.json" if config == "smollm2" else Path(config)
    return model_from_config(path, dtype=dtype, seed=0, device=str(device)).eval()


def inference_peak(model, batch, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        RandomTokens.loss(model, batch)
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


def two_forward(model, batch, device, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            RandomTokens.loss(model, batch)
            RandomTokens.loss(model, batch)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def run_method(name: str, opts: dict, train: dict, args, device, dtype) -> dict:
    from fedtune.config import TrainConfig
    from fedtune.methods.base import FitContext, Upload, trainable_state
    from fedtune.methods.registry import get_method
    from fedtune.randomness import derive_seed
    from fedtune.tasks import ClientData

    spec = get_method(name)
    cfg = spec.config_cls(**opts)
    model = build(args.config, dtype, device)
    if spec.prepare_model is not None:
        t0 = time.perf_counter()
        model = spec.prepare_model(model, cfg, 0)
        prepare_s = time.perf_counter() - t0
    else:
        prepare_s = 0.0
    vocab = model.config.vocab_size
    data = [ClientData(RandomTokens(vocab, args.tokens, 16, c).examples)
            for c in range(args.clients)]
    batch = RandomTokens.collate(data[0].examples[:1])
    infer_mb = inference_peak(model, batch, device)
    server = spec.make_server(cfg, trainable_state(model), 0, "equal")
    client = spec.make_client(cfg, model, 0)
    tc = TrainConfig(**train)
    row: dict = {"method": name, "prepare_s": prepare_s, "inference_peak_mb": infer_mb}
    since: dict[int, int | None] = {}
    for rnd in range(args.rounds):
        phases: dict[str, float] = {}
        uploads, up_bytes, down_bytes, peak = [], [], [], 0.0
        for cid in range(args.clients):
            down = server.download(rnd, since.get(cid))
            down_bytes.append(len(down))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            client.sync(down)
            sync(device)
            phases["client_apply"] = phases.get("client_apply", 0.0) + time.perf_counter() - t0
            ctx = FitContext(round=rnd, client_id=cid, seed=derive_seed(0, rnd, cid), train=tc,
                             task=RandomTokens)
            payload = client.fit(down, data[cid], ctx)
            for k, v in ctx.timings.items():
                phases[k] = phases.get(k, 0.0) + v
            if device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
            uploads.append(Upload(cid, len(data[cid]), payload))
            up_bytes.append(len(payload))
            since[cid] = rnd
        sync(device)
        t0 = time.perf_counter()
        server.aggregate(rnd, uploads)
        sync(device)
        phases["server_aggregate"] = time.perf_counter() - t0
        print(f"{name} round {rnd}: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()),
              flush=True)
    row.update({"phases_s": phases, "round_s": sum(phases.values()),
                "up_bytes_per_client": up_bytes[-1], "down_bytes_per_client": down_bytes[-1],
                "client_peak_mb": peak or None})
    if name in ("fedkseed", "fedkseed_pro"):
        two = two_forward(model, batch, device)
        stepper = client.stepper
        sync(device)
        t0 = time.perf_counter()
        for s in range(5):
            stepper.step(s, partial(RandomTokens.loss, model, batch))
        sync(device)
        row["two_forward_s"] = two
        row["step_s"] = (time.perf_counter() - t0) / 5
        row["step_over_two_forward"] = row["step_s"] / two
    del model, client, server
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], args, env) -> str:
    lines = [(f"## {Path(args.config).stem}, {args.dtype}, {args.device}, batch 1 x "
              f"{args.tokens}, {args.clients} clients per round"), "",
             ("| method | round s | local training s | projection / generation s | server s | "
              "client apply s | bytes up / client | bytes down / client | peak MB | "
              "inference MB |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["phases_s"]
        gen = p.get("project", 0.0)
        lines.append(
            f"| {r['method']} | {r['round_s']:.2f} | {p.get('train', 0.0):.2f} | {gen:.2f} | "
            f"{p.get('server_aggregate', 0.0):.2f} | "
            f"{p.get('client_apply', 0.0) + p.get('reconstruct', 0.0):.2f} | "
            f"{r['up_bytes_per_client']:,} | {r['down_bytes_per_client']:,} | "
            f"{r['client_peak_mb'] or '-'} | {r['inference_peak_mb'] or '-'} |")
    for r in rows:
        if "step_over_two_forward" in r:
            lines.append(f"\n{r['method']}: one step {r['step_s']:.3f} s, two forward passes "
                         f"{r['two_forward_s']:.3f} s, ratio {r['step_over_two_forward']:.2f}.")
    lines.append(f"\n_Command:_ `python benchmarks/bench_gpu.py {' '.join(args.argv)}`, "
                 f"git {env['fedtune_commit']}, load average {env['load_avg_at_start']}")
    return "\n".join(lines)


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "benchmarks/configs/llama-3.2-1b.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fedkseed-steps", type=int, default=200)
    ap.add_argument("--methods", default="ferret,fedkseed,fedavg,federa")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment()
    plans = {
        # the paper's local work: 10 SGD steps of 4 accumulated samples
        "ferret": ({}, {"optimizer": "sgd", "lr": 1e-4, "local_steps": 10, "batch_size": 1,
                        "grad_accum": 4}),
        "fedkseed": ({"k": 4096}, {"local_steps": args.fedkseed_steps, "batch_size": 1}),
        "fedavg": ({}, {"optimizer": "sgd", "lr": 1e-4, "local_steps": 10, "batch_size": 1,
                        "grad_accum": 4}),
        "federa": ({"rank": 8, "alpha": 16}, {"optimizer": "adamw", "lr": 1e-4,
                                              "local_steps": 10, "batch_size": 1,
                                              "grad_accum": 4}),
    }
    rows = []
    for name in args.methods.split(","):
        opts, train = plans[name]
        rows.append(run_method(name, opts, train, args, device, dtype))
    text = markdown(rows, args, env)
    print(text)
    out = args.json or REPO / "benchmarks" / f"gpu_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps({"env": env, "args": vars(args) | {"argv": args.argv},
                               "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
