"""Benchmarks for FedKSeed, FedKSeed-Pro and FedZO on SmolLM2-135M (issue #3).

Parts (each rewrites its own section of ``benchmarks/fedkseed.md``):

* ``probe``: how eta and eps were chosen: the loss curvature ``z^T H z`` along a few random
  directions (second difference), the step that minimises the batch loss along a ZO step is
  ``1 / (z^T H z)``; and ``g`` at several eps (it must not depend on eps where eps is sound).
* ``speed``: one forward pass (1 x 256 tokens), one direction generation, one ZO step, in place
  and keep mode, Gaussian and Rademacher, all in the same process; and the cost of rebuilding the
  global model as K and the rounds grow.
* ``memory``: peak resident memory (VmHWM, reset after loading) of plain inference, a FedKSeed
  client's training (in place and keep), FedZO and FedAvg clients, each in its own process.
* ``accuracy``: a small federated run on the Natural Instructions subset (one client per
  training task, held-out test tasks) for FedKSeed (Gaussian, Rademacher), FedKSeed-Pro, FedZO
  and FedAvg at equal rounds: evaluation loss every round, Rouge-L before and after, bytes of
  the messages actually sent.

Run heavy parts under the shared lock::

    flock /tmp/fedtune-bench.lock python benchmarks/bench_fedkseed.py --part speed
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from benchinfo import environment

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "fedkseed.md"
NI_DEFAULT = REPO.parent / "shared" / "data" / "natural-instructions"


# --- helpers -------------------------------------------------------------------------------------


def load_smollm2():
    from fedtune.config import load_config
    from fedtune.models import load_model, load_tokenizer

    cfg = load_config(None, ["model.source=smollm2"])
    return (load_model(cfg.model, classifier=False, seed=cfg.seed),
            load_tokenizer(cfg.model, classifier=False))


def speed_batch(tok, ni: Path, length: int = 256) -> dict[str, torch.Tensor]:
    """1 x ``length`` tokens of real text (Natural Instructions prompts and outputs), the loss
    on the second half (as an instruction example would have it)."""
    from fedtune.data.natural_instructions import read_natural_instructions
    from fedtune.tasks import IGNORE, alpaca_prompt

    text = ""
    for ex in read_natural_instructions(ni, "train")[::37]:
        text += alpaca_prompt(ex["instruction"], ex["input"]) + ex["output"] + "\n"
        if len(text) > 8 * length:
            break
    ids = tok(text, add_special_tokens=False)["input_ids"][:length]
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[:, : length // 2] = IGNORE
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def batch_example(batch) -> dict:
    """The speed batch as one encoded example (for ClientData)."""
    ids = batch["input_ids"][0].tolist()
    return {"input_ids": ids, "labels": batch["labels"][0].tolist(), "prompt_len": len(ids) // 2,
            "reference": "", "prompt": ""}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def generate_only(params, seed: int, dist: str) -> None:
    """One direction generation, as ``add_directions_`` produces it, without the adds: the
    entries of each tensor written into one reused buffer."""
    from fedtune.randomness import fill_

    buf = torch.empty(max(p.numel() for p in params))
    for i, p in enumerate(params):
        fill_(buf[: p.numel()], seed, dist, index=i)


def machine() -> str:
    env = environment()
    return (f"{env['cpu']}, {env['cores']} cores (shared with other jobs; 1-min load average "
            f"when written {env['load_avg_at_start']:.1f}), Python {env['python']}, torch "
            f"{env['torch']}, transformers {env['transformers']}, randomness v"
            f"{env['randomness_version']}, git {env['fedtune_commit']}")


def write_section(part: str, body: str, command: str) -> None:
    """Replace this part's section of the results file (other parts are kept)."""
    start, end = f"<!-- {part} -->", f"<!-- /{part} -->"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# FedKSeed, FedKSeed-Pro and FedZO on SmolLM2-135M\n\n"
        "Written by `benchmarks/bench_fedkseed.py`; each section says the command, machine and "
        "time it was measured with.\n\n")
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    section = (f"{start}\n{body.rstrip()}\n\n_Command:_ `{command}`  \n_Machine:_ {machine()}  \n"
               f"_Measured:_ {stamp}\n{end}")
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text,
                      flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --- probe: choosing eta and eps -----------------------------------------------------------------


def probe_text(med: float, cmax: float) -> str:
    from fedtune.methods.fedkseed import Config

    eta = Config().eta
    return (
        f"Median curvature {med:.4g}. Along a ZO step `-eta g z` the batch's own loss changes by "
        f"`-eta g^2 + eta^2 g^2 z^T H z / 2`: lowest at eta = 1 / z^T H z = {1 / med:.3g}, and "
        f"lower than before for any eta < 2 / z^T H z (< {2 / cmax:.3g} on every probed "
        "direction). On other batches (the held-out tasks) only the part of the step along "
        "their own gradient helps, a fraction a of it, while the curvature (noise) term is the "
        "same, so the best eta there is about a / z^T H z, times the number of clients averaged "
        "per round (averaging divides the noise). With a between 0.05 and 0.2 and 2-3 clients, "
        f"that is 0.1-0.6 / z^T H z, about 5e-5. That estimate failed: at eta = 5e-5 every ZO "
        "method diverged within 2-3 rounds (the accuracy table with eta 5e-5 below). The "
        "quadratic model holds only within the probed radius (h ||z|| ~ 12), while single "
        "short examples give much larger |g| than this 128-token batch (the eta 5e-6 accuracy table "
        "lists median and max |g|), so steps of norm eta |g| ||z|| left that region. The default "
        f"eta = {eta:g} ({eta * med:.3f} / z^T H z) keeps a median step (|g| ~ 40 in the runs) at "
        "norm ~2, well inside the probed radius, and the largest (|g| ~ 320) within 2x of it; "
        "eps = 5e-4 (the "
        "paper's) stays: g does not depend on eps between 1e-4 and 2e-3 (table below).")


def part_probe(args) -> str:
    from fedtune.methods.base import trainable_parameters
    from fedtune.randomness import add_directions_

    model, tok = load_smollm2()
    params = list(trainable_parameters(model).values())
    from fedtune.tasks import CausalLMTask

    task = CausalLMTask(tok, max_length=args.max_length)
    batch = speed_batch(tok, args.ni, args.max_length)

    def loss() -> float:
        with torch.no_grad():
            return float(task.loss(model, batch))

    l0 = loss()
    h = 1e-3
    rows, curv = [], []
    for i, seed in enumerate(range(101, 101 + args.probe_dirs)):
        with torch.no_grad():
            add_directions_(params, [(seed, h)])
            lp = loss()
            add_directions_(params, [(seed, -2 * h)])
            lm = loss()
            add_directions_(params, [(seed, h)])
        c = (lp + lm - 2 * l0) / h**2
        g = (lp - lm) / (2 * h)
        curv.append(c)
        rows.append([i, f"{g:.3f}", f"{c:.4g}", f"{1 / c:.3g}" if c > 0 else "-"])
        print(f"direction {i}: g {g:.4f} curvature {c:.4g}", flush=True)
    med = statistics.median(curv)
    eps_rows = []
    for eps in (1e-4, 5e-4, 1e-3, 2e-3):
        with torch.no_grad():
            add_directions_(params, [(101, eps)])
            lp = loss()
            add_directions_(params, [(101, -2 * eps)])
            lm = loss()
            add_directions_(params, [(101, eps)])
        eps_rows.append([f"{eps:g}", f"{(lp - lm) / (2 * eps):.4f}"])
        print(f"eps {eps}: g {(lp - lm) / (2 * eps):.4f}", flush=True)
    return "\n\n".join([
        "## Choosing eta and eps (probe)",
        (f"Batch: 1 x {args.max_length} tokens of Natural Instructions text, loss {l0:.4f}. "
        f"Curvature along Gaussian directions, `z^T H z ~ (L(w+hz) + L(w-hz) - 2 L(w)) / h^2` "
        f"with h = {h:g}:"),
        table(["direction", "g = z.grad (central, h)", "z^T H z", "1 / z^T H z"], rows),
        probe_text(med, max(curv)),
        ("The projected gradient `g` for one direction at several eps (it should not depend on "
        "eps where float32 resolution and curvature are both negligible):"),
        table(["eps", "g"], eps_rows),
    ])


# --- speed ---------------------------------------------------------------------------------------


def part_speed(args) -> str:
    from fedtune.methods.base import trainable_parameters
    from fedtune.methods.zo import ZOStepper
    from fedtune.randomness import add_directions_
    from fedtune.tasks import CausalLMTask

    model, tok = load_smollm2()
    params = list(trainable_parameters(model).values())
    d = sum(p.numel() for p in params)
    task = CausalLMTask(tok)
    batch = speed_batch(tok, args.ni, 256)

    def fwd():
        with torch.no_grad():
            return task.loss(model, batch)

    steppers = {(dist, mode): ZOStepper(params, 5e-4, 1e-12, dist, mode)
                for dist in ("gaussian", "rademacher") for mode in ("inplace", "keep")}
    times: dict[str, list[float]] = {}

    def rec(key, t):
        times.setdefault(key, []).append(t)

    from fedtune.randomness import fill_

    full = [torch.empty(p.shape) for p in params]  # keep-mode-style model-sized buffers
    seed = 1000
    for rep in range(args.reps + 1):  # rep 0 warms up (page faults, keep buffers)
        for dist in ("gaussian", "rademacher"):
            f1 = timed(fwd)
            f2 = timed(fwd)
            sd = seed + rep
            g = timed(lambda dist=dist, sd=sd: generate_only(params, sd, dist))
            gfull = timed(lambda dist=dist: [fill_(b, seed, dist, index=i)
                                             for i, b in enumerate(full)])
            si = timed(lambda dist=dist, sd=sd: steppers[dist, "inplace"].step(sd, fwd))
            sk = timed(lambda dist=dist, sd=sd: steppers[dist, "keep"].step(sd, fwd))
            apply8 = timed(lambda dist=dist: add_directions_(
                params, [(s, 1e-12) for s in range(8)], dist))
            if rep:
                for k, t in (("fwd", f1), ("fwd", f2), (f"gen_{dist}", g),
                             (f"genfull_{dist}", gfull), (f"step_inplace_{dist}", si),
                             (f"step_keep_{dist}", sk), (f"apply8_{dist}", apply8)):
                    rec(k, t)
            print(f"rep {rep} {dist}: fwd {f1:.2f}/{f2:.2f} gen {g:.2f} full-gen {gfull:.2f} "
                  f"step inplace {si:.2f} keep {sk:.2f} apply 8 seeds {apply8:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    f = med["fwd"]
    rows = []
    for dist in ("gaussian", "rademacher"):
        g = med[f"gen_{dist}"]
        si, sk = med[f"step_inplace_{dist}"], med[f"step_keep_{dist}"]
        rows.append([dist, f"{2 * f:.2f}", f"{g:.2f}", f"{med[f'genfull_{dist}']:.2f}",
                     f"{si:.2f}", f"{si / (2 * f + 3 * g):.2f}", f"{sk:.2f}",
                     f"{sk / (2 * f + g):.2f}"])
    speedup = med["gen_gaussian"] / med["gen_rademacher"]
    # rebuild cost: one generation-and-add per distinct seed touched (at most K)
    per_seed = {dist: med[f"apply8_{dist}"] / 8 for dist in ("gaussian", "rademacher")}
    rb = []
    for k in (1024, 4096):
        for label, steps_per_round in (((f"this benchmark ({args.clients} clients x "
                                        f"{args.steps} steps)"), args.clients * args.steps),
                                       ("paper NI (37 clients x 200 steps)", 7400)):
            for rounds in (1, 10, 40):
                n = rounds * steps_per_round
                distinct = k * (1 - (1 - 1 / k) ** n)
                rb.append([k, label, rounds, f"{distinct:.0f}",
                           f"{distinct * per_seed['gaussian']:.0f}",
                           f"{distinct * per_seed['rademacher']:.0f}"])
    return "\n\n".join([
        f"## Speed (seconds, medians of {args.reps} repetitions after a warm-up)",
        (f"SmolLM2-135M, d = {d:,} trainable parameters (float32), batch 1 x 256 tokens, "
        f"torch threads {torch.get_num_threads()}. 'gen' is one direction generated in "
        "cache-sized pieces as the in-place step does it (no add); 'full gen' fills model-sized "
        "buffers (what keep mode does once per step). Step ratios: in place vs. 2 forward + 3 "
        "generations (target <= 1.1), keep vs. 2 forward + 1 generation."),
        table(["direction", "2 forward", "gen", "full gen", "step in place", "ratio",
               "step keep", "ratio"], rows),
        (f"Rademacher generates {speedup:.1f}x faster than Gaussian. Applying a seed (generate "
        f"and add over the model, several seeds per walk): {per_seed['gaussian']:.3f} s "
        f"Gaussian, {per_seed['rademacher']:.3f} s Rademacher."),
        "### Rebuilding the global model from w0 (a new or long-absent client)",
        ("Cost = distinct seeds touched so far x the per-seed cost above; the expected distinct "
        "count after n uniform draws from K seeds is K (1 - (1 - 1/K)^n), so it saturates at K "
        "(the reference code's per-round replay of all K seeds is the saturated cost, every "
        "round). The tests measure actual rebuilds on a tiny model "
        "(`pytest -s tests/test_fedkseed.py -k rebuild_time`)."),
        table(["K", "setting", "rounds", "distinct seeds", "rebuild s (Gaussian)",
               "rebuild s (Rademacher)"], rb),
    ])


# --- memory --------------------------------------------------------------------------------------


def _hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def memory_child(scenario: str, ni: Path) -> dict:
    from fedtune.config import TrainConfig
    from fedtune.methods import fedavg, fedkseed, fedzo
    from fedtune.methods.base import FitContext, trainable_state
    from fedtune.tasks import CausalLMTask, ClientData

    model, tok = load_smollm2()
    task = CausalLMTask(tok)
    batch = speed_batch(tok, ni, 256)
    data = ClientData([batch_example(batch)] * 4)
    steps = 3
    ctx = FitContext(round=0, client_id=0, seed=1, task=task,
                     train=TrainConfig(local_steps=steps, batch_size=1, optimizer="sgd", lr=1e-6))
    down = None
    if scenario.startswith("fedkseed"):
        mode = "keep" if scenario.endswith("keep") else "inplace"
        cfg = fedkseed.Config(mode=mode)
        client = fedkseed.KSeedClient(cfg, model, 0)
        down = fedkseed.KSeedServer(cfg, None, 0, "examples").download(0, None)
    elif scenario == "fedzo":
        cfg = fedzo.Config()
        client = fedzo.FedZOClient(cfg, model, 0)
        down = fedzo.FedZOServer(cfg, trainable_state(model), 0, "examples").download(0, None)
    elif scenario == "fedavg":
        cfg = fedavg.Config()
        client = fedavg.WeightsClient(cfg, model, 0)
        down = fedavg.WeightsServer(cfg, trainable_state(model), 0, "examples").download(0, None)
    gc.collect()
    base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    _reset_hwm()
    t0 = time.perf_counter()
    if scenario == "inference":
        with torch.no_grad():
            for _ in range(2 * steps):
                task.loss(model, batch)
        up = b""
    else:
        up = client.fit(down, data, ctx)
    return {"scenario": scenario, "peak_mb": _hwm_kb() / 1024, "base_mb": base / 1024,
            "seconds": time.perf_counter() - t0, "up_bytes": len(up),
            "down_bytes": len(down) if down is not None else 0}


def part_memory(args) -> str:
    scenarios = ["inference", "fedkseed", "fedkseed_keep", "fedzo", "fedavg"]
    res = {}
    for sc in scenarios:
        cmd = [sys.executable, __file__, "--memory-child", sc, "--ni", str(args.ni)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[sc] = json.loads(out.stdout.strip().splitlines()[-1])
        print(res[sc], flush=True)
    inf = res["inference"]["peak_mb"]
    labels = {"inference": "plain inference (6 eval forward passes)",
              "fedkseed": "FedKSeed client, in place (3 ZO steps)",
              "fedkseed_keep": "FedKSeed client, keep mode (3 ZO steps)",
              "fedzo": "FedZO client (3 ZO steps + delta upload)",
              "fedavg": "FedAvg client (3 SGD steps + weights upload)"}
    rows = [[labels[sc], f"{res[sc]['base_mb']:.0f}", f"{res[sc]['peak_mb']:.0f}",
             f"{res[sc]['peak_mb'] / inf:.3f}"] for sc in scenarios]
    return "\n\n".join([
        "## Memory (peak resident set, MB)",
        ("Each row is its own process: load SmolLM2-135M (float32), build the client half and "
        "receive its download, then reset the peak (`/proc/self/clear_refs` 5) and run the "
        "phase on a 1 x 256-token batch; the peak is VmHWM. 'before' is the resident set at the "
        "reset (model, libraries, the received download)."),
        table(["phase", "before", "peak", "peak / inference"], rows),
        (f"FedKSeed in place: **{res['fedkseed']['peak_mb'] / inf:.3f}x** plain inference "
        "(target <= 1.1x)."),
    ])


# --- accuracy ------------------------------------------------------------------------------------


def part_accuracy(args) -> str:
    """Each method is one ``inprocess.run`` of the same config: the round loop every engine
    uses, so the figures are those a user's run gives."""
    from fedtune.config import load_config
    from fedtune.engines.inprocess import run
    from fedtune.evaluation import SCORER_NAME

    common = [
        f"model.source={args.model}", "data.source=natural_instructions", f"data.path={args.ni}",
        f"data.max_length={args.max_length}", "partition.scheme=task",
        f"federation.rounds={args.rounds}",
        f"federation.clients_per_round={args.clients / 48}",
        f"train.local_steps={args.steps}", "train.batch_size=1",
        f"eval.max_examples={args.eval_examples}", "eval.batch_size=8",
        f"eval.generate_examples={args.gen_examples}", f"eval.max_new_tokens={args.new_tokens}",
        "eval.generate_every=0", "output.save_model=false", f"seed={args.seed}",
        "data.task=instruction", "train.optimizer=sgd",
    ]
    zo = [f"method.eta={args.eta}", f"method.eps={args.eps}", "method.mode=keep"]
    kseed = [*zo, f"method.k={args.k}"]
    runs = [
        ("FedKSeed", ["method.name=fedkseed", *kseed]),
        ("FedKSeed (Rademacher)", ["method.name=fedkseed", *kseed, "method.distribution=rademacher"]),
        ("FedKSeed-Pro", ["method.name=fedkseed_pro", *kseed]),
        ("FedZO", ["method.name=fedzo", *zo]),
        ("FedAvg", ["method.name=fedavg", "train.optimizer=adamw", f"train.lr={args.fedavg_lr}"]),
    ]
    if args.methods:
        runs = [r for r in runs if r[0] in args.methods.split(",")]
    results = []
    for name, over in runs:
        t0 = time.perf_counter()
        rows = run(load_config(None, [*common, *over]),
                   Path("/tmp") / f"bench-fedkseed-{os.getpid()}-{len(results)}", overwrite=True)
        trained = rows[1:]
        results.append({
            "name": name, "losses": [r["eval_loss"] for r in rows],
            "rouge": (rows[0]["rouge_l"], rows[-1]["rouge_l"]),
            "up": float(np.mean([r["bytes_up_per_client"] for r in trained])),
            "down": float(np.mean([r["bytes_down_per_client"] for r in trained])),
            "g": [(r["method_abs_g_median"], r["method_abs_g_max"]) for r in trained
                  if "method_abs_g_median" in r],
            "train_s": sum(r["time_fit"] for r in trained), "total_s": time.perf_counter() - t0})
        gc.collect()
    fedavg_up = next((r["up"] for r in results if r["name"] == "FedAvg"), None)
    fedavg_down = next((r["down"] for r in results if r["name"] == "FedAvg"), None)
    rows = []
    for res in results:
        ls = res["losses"]
        mono = all(b < a for a, b in itertools.pairwise(ls))
        g = res["g"]
        rows.append([res["name"], " -> ".join(f"{x:.4f}" for x in ls),
                     "yes" if mono else "no", f"{res['rouge'][0]:.4f}", f"{res['rouge'][1]:.4f}",
                     f"{res['up']:,.0f}", f"{res['down']:,.0f}",
                     f"{fedavg_up / res['up']:,.0f}x" if fedavg_up else "-",
                     f"{fedavg_down / res['down']:,.0f}x" if fedavg_down else "-",
                     (f"{statistics.median(m for m, _ in g):.1f} / {max(x for _, x in g):.0f}"
                      if g else "-"),
                     f"{res['train_s']:.0f}"])
    cfg = load_config(None, common)
    return "\n\n".join([
        f"## Accuracy at equal rounds, eta {args.eta:g} (Natural Instructions, SmolLM2-135M)",
        (f"One client per training task, {args.clients} sampled per "
        f"round, {args.rounds} rounds, {args.steps} local steps of batch 1 per client, "
        f"examples cut to {args.max_length} tokens (prompt cut from the left); each method is one "
        "`fedtune.engines.inprocess.run` of the same config. Evaluation: loss "
        f"on {cfg.eval.max_examples} held-out test-task examples after every round; Rouge-L "
        f"({SCORER_NAME}) of greedy generations (max {args.new_tokens} new tokens) on "
        f"{args.gen_examples} of them, before and after. ZO methods: eta {args.eta:g}, eps "
        f"{args.eps:g}, K {args.k}, keep mode (the same directions as in place, one generation "
        f"per step, to fit the time budget); FedAvg: AdamW lr {args.fedavg_lr:g}, same steps "
        "and batches. Bytes: mean length of the encoded messages per client per round (download "
        "as sent to each sampled client; new clients get the dense form). |g|: the median of "
        "the rounds' median |g| over the uploaded steps, and the largest |g| of the run (the "
        "FedKSeed server's `abs_g_median` / `abs_g_max` round metrics)."),
        table(["method", "eval loss by round (0 = before)", "falls every round",
               "Rouge-L before", "Rouge-L after", "bytes up", "bytes down", "FedAvg/ up",
               "FedAvg/ down", "median / max abs g", "train s"], rows),
        ("These are a handful of rounds on 2 shared CPU cores (the paper runs 40 rounds of 37 "
        "clients x 200 steps): they show the direction of the loss, not converged accuracy; "
        "Rouge-L on so few examples moves in steps of a few points."),
    ])


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=["probe", "speed", "memory", "accuracy", "all"],
                    default="all")
    ap.add_argument("--ni", type=Path, default=NI_DEFAULT)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); use 1 on a busy machine, where 2 "
                         "threads spin against other jobs and a forward pass takes 5-10x longer")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--probe-dirs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--eta", type=float, default=5e-6)
    ap.add_argument("--eps", type=float, default=5e-4)
    ap.add_argument("--fedavg-lr", type=float, default=1e-5)
    ap.add_argument("--eval-examples", type=int, default=12)
    ap.add_argument("--gen-examples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2", help="accuracy part: smollm2, or tiny (smoke)")
    ap.add_argument("--out", type=Path, default=None, help="results markdown file")
    ap.add_argument("--methods", default="", help="comma-separated subset of the accuracy runs")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.out is not None:
        global RESULTS
        RESULTS = args.out
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.ni)))
        return
    if not args.ni.is_dir():
        sys.exit(f"Natural Instructions not found at {args.ni}; pass --ni")
    command = "python benchmarks/bench_fedkseed.py " + " ".join(sys.argv[1:])
    parts = ["probe", "speed", "memory", "accuracy"] if args.part == "all" else [args.part]
    for part in parts:
        t0 = time.perf_counter()
        body = globals()[f"part_{part}"](args)
        body += f"\n\n_Wall time of this part:_ {time.perf_counter() - t0:.0f} s"
        write_section(f"accuracy-eta{args.eta:g}" if part == "accuracy" else part, body, command)
        print(f"wrote the {part} section of {RESULTS}", flush=True)


if __name__ == "__main__":
    main()
