"""The round loop every engine shares: start or resume, one round, finish.

A round: sample clients; for each, the server's download (built for the round that client last
saw) reaches the client through the engine's :class:`Transport` (the in-process engine's
shared client half, or Flower's SuperNodes), which trains (:func:`fit_client`) and returns its
upload; the server aggregates the uploads it accepts (a refused one, or a client whose training
diverged, is dropped from the round and listed under ``rejected``); the evaluator half syncs to
the new global model and is evaluated. Byte counts are the lengths of the messages; times are
per phase; the checkpoint is written after every round, so a killed run resumes and ends
bitwise where an uninterrupted one would.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from fedtune import experiment as ex
from fedtune import wire
from fedtune.config import ExperimentConfig, save_config
from fedtune.evaluation import BASELINE_KEYS, SCORERS, evaluate
from fedtune.methods import privacy
from fedtune.methods.base import FitContext, Upload, trainable_parameters
from fedtune.methods.training import NonFiniteLossError
from fedtune.runlog import CheckpointError, RunLog, format_table, peak_rss_mb

CHECKPOINT_VERSION = 1


class Progress:
    """One line per client on the terminal; the step counter updates in place on a TTY."""

    def __init__(self, enabled: bool = True, stream=sys.stderr):
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and stream.isatty()

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def step(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()


def default_run_dir(cfg: ExperimentConfig) -> Path:
    name = cfg.output.name or f"{cfg.method.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.output.dir).expanduser() / name


@dataclass
class ClientResult:
    """What came back from one client in a round."""

    client_id: int
    num_examples: int
    payload: bytes
    download_bytes: int
    train_loss: float
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    """Why the client's local work failed (e.g. a non-finite loss); it is then not aggregated
    and is listed under ``rejected``."""
    upload_bytes: int | None = None
    """Bytes the client sent when that is not ``len(payload)`` (secure aggregation: its
    masked vector and key material, as Flower serialises them)."""


@dataclass
class SecureSum:
    """What a transport with secure aggregation learns in a round instead of the uploads."""

    aggregate: Any
    """``methods.secure.Sum``: the weighted mean of the clients' vectors (and FedKSeed-Pro's
    history sums)."""
    clients: list[int]
    """The clients whose vectors are in it."""
    digests: list[str] = field(default_factory=list)
    """What they report in the clear about their frozen base (FedIT/FeDeRA)."""


class Transport(Protocol):
    """How a round's downloads reach the clients and their uploads come back."""

    def fit_round(self, round_: int, downloads: dict[int, bytes]) -> list[ClientResult]:
        """Deliver ``downloads`` (client id -> message), return the results of the clients
        that answered (a transport over a network may return fewer)."""

    # Optional: ``secure_sum(round_) -> SecureSum | None``. A transport with secure
    # aggregation returns results without payloads and the round's sum here; the loop then
    # applies the sum (``methods.secure.apply_mean``) instead of ``server.aggregate``.


def fit_client(exp: ex.Experiment, half, round_: int, client_id: int, download: bytes,
               on_step: Callable[[int, float], None] | None = None) -> ClientResult:
    """One client's local work, the same in every engine: seed from (run seed, round, client),
    ``half.fit``, its timings and mean training loss. A client whose training diverges comes
    back with ``error`` set (the round loop rejects it); a bad download raises MessageError."""
    cfg = exp.cfg
    seed = ex.client_seed(cfg, round_, client_id)
    torch.manual_seed(seed)
    ctx = FitContext(round=round_, client_id=client_id, seed=seed, train=cfg.train,
                     task=exp.task, **({"on_step": on_step} if on_step else {}))
    n = len(exp.clients[client_id])
    t0 = time.perf_counter()
    try:
        payload = half.fit(download, exp.clients[client_id], ctx)
    except NonFiniteLossError as e:
        return ClientResult(client_id, n, b"", len(download), float("nan"), error=str(e))
    ctx.timings["fit"] = time.perf_counter() - t0
    loss = sum(ctx.losses) / len(ctx.losses) if ctx.losses else float("nan")
    return ClientResult(client_id, n, payload, len(download), loss, ctx.timings)


def federate(exp: ex.Experiment, server, evaluator, transport: Transport,
             run_dir: str | Path | None = None, *, resume: bool = False,
             overwrite: bool = False, out: Progress | None = None) -> list[dict[str, Any]]:
    """Run the experiment's rounds with ``server``, reaching clients through ``transport`` and
    evaluating ``evaluator.model`` (a client half) after syncing it; returns the metrics rows
    (round 0 is the evaluation before training)."""
    out = out or Progress(True)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(exp.cfg)
    log = RunLog(run_dir)
    log.claim(resume=resume, overwrite=overwrite)
    try:
        loop = _start(exp, server, evaluator, transport, log, resume, out)
        for r in range(loop.start, exp.cfg.federation.rounds):
            _round(loop, r)
        return _finish(loop)
    finally:
        log.release()


@dataclass
class _Loop:
    """The round loop's state between rounds (all of it is in the checkpoint)."""

    exp: ex.Experiment
    server: Any
    evaluator: Any
    transport: Transport
    log: RunLog
    out: Progress
    identity: dict[str, Any]
    rows: list[dict[str, Any]]
    start: int = 0
    last_sync: dict[int, int] = field(default_factory=dict)
    """client -> the global round its model was last synced to"""
    evaluator_round: int | None = 0
    """the global round the evaluator's model was synced to"""
    t_start: float = field(default_factory=time.perf_counter)
    accounting: privacy.Accounting | None = None
    """``privacy`` on: the accountant's parameters, for ``epsilon`` in every row."""


def _start(exp, server, evaluator, transport, log: RunLog, resume: bool,
           out: Progress) -> _Loop:
    """Resume from the checkpoint, or write the config and evaluate round 0."""
    cfg, model = exp.cfg, evaluator.model
    loop = _Loop(exp, server, evaluator, transport, log, out, run_identity(cfg), [],
                 accounting=privacy.accounting(cfg, len(exp.clients)))
    if loop.accounting is not None:
        out.line(_privacy_line(cfg, loop.accounting))
    ckpt = log.load_checkpoint(loop.identity) if resume else None
    if resume and ckpt is None:
        out.line(f"no checkpoint in {log.dir}; starting from round 0")
    if ckpt is not None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{log.checkpoint_path}: checkpoint version "
                                  f"{ckpt.get('version')}, this fedtune writes "
                                  f"{CHECKPOINT_VERSION}")
        server.load_state_dict(ckpt["server"])
        loop.start, loop.rows = ckpt["round"], ckpt["metrics"]
        loop.last_sync = {int(k): v for k, v in ckpt["last_sync"].items()}
        if ckpt.get("evaluator") is not None:  # a half whose own state must be exact
            evaluator.load_state_dict(ckpt["evaluator"])
            loop.evaluator_round = ckpt["evaluator_round"]
        else:
            evaluator.sync(server.download(loop.start, since=None))
            loop.evaluator_round = loop.start
        log.write_metrics(loop.rows)
        out.line(f"resumed {log.dir} at round {loop.start}/{cfg.federation.rounds}")
        return loop
    save_config(cfg, log.dir / "config.yaml")
    param = next(model.parameters())
    n_params = sum(p.numel() for p in trainable_parameters(model).values())
    out.line(f"fedtune: {cfg.method.name} on {cfg.data.source} with {cfg.model.source} "
             f"({param.device}, {str(param.dtype).removeprefix('torch.')}), "
             f"{len(exp.clients)} clients, {cfg.federation.rounds} rounds, "
             f"{n_params:,} trainable parameters -> {log.dir}")
    row = {"round": 0, **_eval_point(exp, model, 0, _generate_now(cfg, 0)),
           "peak_rss_mb": peak_rss_mb(), **_gpu_memory(model)}
    loop.rows.append(row)
    log.write_metrics(loop.rows)
    out.line(_describe(row))
    return loop


def _round(loop: _Loop, r: int) -> None:
    """Round ``r``: sample, download, fit, aggregate what is accepted, evaluate, checkpoint."""
    exp, cfg, server, evaluator = loop.exp, loop.exp.cfg, loop.server, loop.evaluator
    t_round = time.perf_counter()
    sampled = ex.sample_clients(cfg, r, list(range(len(exp.clients))))
    t0 = time.perf_counter()
    downloads = {cid: server.download(r, since=loop.last_sync.get(cid)) for cid in sampled}
    times: dict[str, float] = {"download": time.perf_counter() - t0}
    answered = loop.transport.fit_round(r, downloads)
    dropped = sorted(set(sampled) - {res.client_id for res in answered})
    rejected = [{"client": res.client_id, "reason": res.error}
                for res in answered if res.error is not None]
    for res in answered:
        loop.last_sync[res.client_id] = r
        for k, v in res.timings.items():
            times[k] = times.get(k, 0.0) + v
    t0 = time.perf_counter()
    summed = loop.transport.secure_sum(r) if hasattr(loop.transport, "secure_sum") else None
    if summed is not None:
        method_metrics, kept = _aggregate_secure(server, r, summed, len(sampled),
                                                 cfg.federation.min_clients)
    else:
        uploads = [Upload(res.client_id, res.num_examples, res.payload)
                   for res in answered if res.error is None]
        method_metrics, uploads = _aggregate(server, r, uploads, rejected, len(sampled),
                                             cfg.federation.min_clients)
        kept = {u.client_id for u in uploads}
    results = [res for res in answered if res.error is None and res.client_id in kept]
    times["aggregate"] = time.perf_counter() - t0

    done = r + 1
    row: dict[str, Any] = {"round": done, "clients": [res.client_id for res in results],
                           "dropped": dropped, "rejected": rejected}
    if done % cfg.eval.every == 0 or done == cfg.federation.rounds:
        t0 = time.perf_counter()
        # The in-process evaluator is the shared client half (it saw round r's download);
        # on Flower it is a separate half that may have skipped rounds (eval.every > 1).
        evaluator.sync(server.download(done, since=loop.evaluator_round))
        loop.evaluator_round = done
        times["apply"] = time.perf_counter() - t0
        row.update(_eval_point(exp, evaluator.model, done, _generate_now(cfg, done)))
    row.update(_traffic(results))
    row.update({
        **{f"time_{k}": v for k, v in sorted(times.items())},
        "time_round": time.perf_counter() - t_round,
        "peak_rss_mb": peak_rss_mb(),
        **_gpu_memory(evaluator.model),
        **{f"method_{k}": v for k, v in method_metrics.items()},
        **({"epsilon": loop.accounting.epsilon(done)} if loop.accounting else {}),
    })
    loop.rows.append(row)
    loop.log.save_checkpoint({
        "version": CHECKPOINT_VERSION, "round": done, "server": server.state_dict(),
        "last_sync": loop.last_sync, "metrics": loop.rows,
        "evaluator_round": loop.evaluator_round,
        "evaluator": evaluator.state_dict() if hasattr(evaluator, "state_dict") else None},
        loop.identity)
    loop.log.write_metrics(loop.rows)
    loop.out.line(_describe(row) + (f"  dropped {dropped}" if dropped else "")
                  + (f"  rejected {[x['client'] for x in rejected]}" if rejected else ""))


def _traffic(results: list[ClientResult]) -> dict[str, float]:
    up = [len(res.payload) if res.upload_bytes is None else res.upload_bytes
          for res in results]
    down = [res.download_bytes for res in results]
    weights = [res.num_examples for res in results]
    return {"train_loss": sum(w * res.train_loss for w, res in zip(weights, results))
            / max(sum(weights), 1),
            "bytes_up_per_client": sum(up) / len(up),
            "bytes_down_per_client": sum(down) / len(down),
            "bytes_up_total": sum(up), "bytes_down_total": sum(down)}


def _finish(loop: _Loop) -> list[dict[str, Any]]:
    """The final model, the summary and the export."""
    cfg, log, model = loop.exp.cfg, loop.log, loop.evaluator.model
    if cfg.output.save_model:
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous()
                   for n, p in trainable_parameters(model).items()},
                  str(log.dir / "model.safetensors"))
    summary = summarise(cfg, loop.rows, time.perf_counter() - loop.t_start)
    if loop.accounting is not None:
        summary["privacy"] = _privacy_summary(cfg, loop.accounting, len(loop.rows) - 1)
    summary["trainable_params"] = sum(p.numel() for p in trainable_parameters(model).values())
    summary["model_params"] = sum(p.numel() for p in model.parameters())
    log.write_summary(summary)
    if cfg.output.save_model and cfg.output.export:
        from fedtune.export import export_run

        export_run(log.dir, log.dir / "export", model=model)
    if loop.out.enabled:
        print(summary_table(loop.rows), file=sys.stdout)
        print(_summary_text(summary), file=sys.stdout)
    return loop.rows


def _privacy_line(cfg: ExperimentConfig, acc: privacy.Accounting) -> str:
    p = cfg.privacy
    chosen = (f"chosen for target epsilon {p.target_epsilon:g} over {cfg.federation.rounds} "
              "rounds" if p.target_epsilon is not None else "set")
    return (f"privacy: {p.noise} noise, clip norm {p.clip_norm:g}, noise multiplier "
            f"{acc.noise_multiplier:.4g} ({chosen}), {acc.per_round} of {acc.clients} clients "
            f"per round ({p.sampling} sampling), delta {p.delta:g}")


def _privacy_summary(cfg: ExperimentConfig, acc: privacy.Accounting, rounds: int
                     ) -> dict[str, Any]:
    p = cfg.privacy
    return {"epsilon": acc.epsilon(rounds), "delta": p.delta,
            "noise_multiplier": acc.noise_multiplier, "target_epsilon": p.target_epsilon,
            "clip_norm": p.clip_norm, "noise": p.noise, "sampling": p.sampling,
            "clients": acc.clients, "clients_per_round": acc.per_round,
            "accountant": "dp-accounting RDP"}


def _eval_point(exp: ex.Experiment, model, round_: int, generate_now: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(ex.client_seed(exp.cfg, round_, -1))
    metrics = evaluate(model, exp.task, exp.tokenizer, exp.test, exp.cfg.eval,
                       labels=exp.labels, generate_now=generate_now,
                       with_baselines=round_ == 0)
    metrics["time_eval"] = time.perf_counter() - t0
    return metrics


def _gpu_memory(model) -> dict[str, float]:
    """``peak_gpu_mb``: the most this process's CUDA allocator held on the model's GPU since
    the start (``torch.cuda.max_memory_allocated``); nothing for a model on the CPU."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def _generate_now(cfg: ExperimentConfig, round_done: int) -> bool:
    every = cfg.eval.generate_every
    return round_done in (0, cfg.federation.rounds) or (every > 0 and round_done % every == 0)


def run_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this config: the method and its options,
    the run seed, the model and its dtype, the data and the partition (not the device, the
    number of rounds or the evaluation settings, which a resumed run may change)."""
    from dataclasses import asdict

    model = asdict(cfg.model)
    model.pop("device", None)
    identity = {"method": cfg.method.name, "method_config": asdict(cfg.method_config()),
                "seed": cfg.seed, "model": model, "data": asdict(cfg.data),
                "partition": asdict(cfg.partition)}
    if cfg.privacy.enabled:  # the noise, and with target_epsilon its scale, depend on these
        identity["privacy"] = {**asdict(cfg.privacy), "rounds": cfg.federation.rounds
                               if cfg.privacy.target_epsilon is not None else None}
    return identity


def _aggregate(server, round_: int, uploads: list[Upload], rejected: list[dict[str, Any]],
               sampled: int, min_clients: int) -> tuple[dict[str, float], list[Upload]]:
    """``server.aggregate`` on the uploads that pass: an upload the server refuses
    (``MessageError`` naming its client) is dropped, with the reason added to ``rejected``, and
    the rest are aggregated again (a refused aggregate leaves the server as it was). Stops the
    run when fewer than ``min_clients`` are left: the last checkpoint is kept."""
    while True:
        if len(uploads) < min_clients:
            raise RuntimeError(
                f"round {round_ + 1}: only {len(uploads)} of {sampled} clients answered with an "
                f"acceptable update (federation.min_clients = {min_clients}; rejected: "
                f"{rejected}); the checkpoint of round {round_} is kept, resume when clients "
                "are back")
        try:
            return server.aggregate(round_, uploads), uploads
        except wire.MessageError as e:
            if e.client_id is None or e.client_id not in {u.client_id for u in uploads}:
                raise
            rejected.append({"client": e.client_id, "reason": str(e)})
            uploads = [u for u in uploads if u.client_id != e.client_id]


def _aggregate_secure(server, round_: int, summed: SecureSum, sampled: int,
                      min_clients: int) -> tuple[dict[str, float], set[int]]:
    """``methods.secure.apply_mean`` on a secure round's sum: nothing can be rejected (no
    upload is visible), so a bad sum stops the run, as too few clients do."""
    from fedtune.methods import secure

    if len(summed.clients) < min_clients:
        raise RuntimeError(
            f"round {round_ + 1}: only {len(summed.clients)} of {sampled} clients are in the "
            f"secure sum (federation.min_clients = {min_clients}); the checkpoint of round "
            f"{round_} is kept, resume when clients are back")
    return secure.apply_mean(server, round_, summed.aggregate, summed.digests), set(summed.clients)


def _describe(row: dict[str, Any]) -> str:
    parts = [f"round {row['round']}:"]
    for key, label in [("train_loss", "train loss"), ("eval_loss", "eval loss"),
                       ("rouge_l", "Rouge-L"), ("accuracy", "accuracy")]:
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4f}")
    for key, label in [("accuracy_majority", "the majority label scores"),
                       ("rouge_l_copy", "copying the input scores")]:  # round 0's baselines
        if row.get(key) is not None:
            parts.append(f"({label} {row[key]:.4f})")
    return "  ".join(parts)


SUMMARY_COLUMNS = [
    ("round", "round", "d"),
    ("train_loss", "train loss", ".4f"),
    ("eval_loss", "eval loss", ".4f"),
    ("rouge_l", "Rouge-L", ".4f"),
    ("accuracy", "accuracy", ".3f"),
    ("bytes_up_per_client", "up B/client", ",.0f"),
    ("bytes_down_per_client", "down B/client", ",.0f"),
    ("time_round", "round s", ".1f"),
    ("peak_rss_mb", "peak MiB", ".0f"),
]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The run's table; with privacy, epsilon after each round too."""
    private = any("epsilon" in r for r in rows)
    return format_table(rows, SUMMARY_COLUMNS + ([("epsilon", "epsilon", ".3g")] if private
                                                 else []))


def summarise(cfg: ExperimentConfig, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    first, last = rows[0], rows[-1]
    keys = ("eval_loss", "rouge_l", "accuracy")
    trained = rows[1:]
    return {
        "method": cfg.method.name,
        "rounds": len(trained),
        "before": {k: first.get(k) for k in keys if first.get(k) is not None},
        "after": {k: last.get(k) for k in keys if last.get(k) is not None},
        "bytes_up_total": sum(r.get("bytes_up_total", 0) for r in trained),
        "bytes_down_total": sum(r.get("bytes_down_total", 0) for r in trained),
        "wall_time_s": wall,
        "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in rows),
        **({"peak_gpu_mb": max(r["peak_gpu_mb"] for r in rows)} if "peak_gpu_mb" in last else {}),
        "rouge_scorer": SCORERS[cfg.eval.rouge],
        "baselines": {k: first[k] for k in BASELINE_KEYS if first.get(k) is not None},
    }


def _summary_text(s: dict[str, Any]) -> str:
    before = ", ".join(f"{k} {v:.4f}" for k, v in s["before"].items())
    after = ", ".join(f"{k} {v:.4f}" for k, v in s["after"].items())
    eps = s.get("privacy")
    private = (f"\nprivacy: epsilon {eps['epsilon']:.3g} at delta {eps['delta']:g}, noise "
               f"multiplier {eps['noise_multiplier']:.4g}" if eps else "")
    return (f"\nbefore: {before}\nafter:  {after}{private}\n"
            f"wall time {s['wall_time_s']:.0f} s (this run's process), peak memory "
            f"{s['peak_rss_mb']:.0f} MiB, bytes up {s['bytes_up_total']:,}, "
            f"down {s['bytes_down_total']:,}")
