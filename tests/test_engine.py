"""The in-process engine end to end on a tiny model: metrics recorded, runs reproducible, a run
killed with SIGKILL in the middle of a round resumes to the same final model and metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.engines.inprocess import run

from .conftest import BASE, tiny_overrides

VOLATILE = ("time_", "peak_")


def _stable(rows):
    """The rows without timings and memory (which change from run to run)."""
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE) and not k.endswith("_s")}
            for r in rows]


def test_run_records_metrics_and_same_config_gives_same_numbers(jsonl_data, tmp_path):
    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs"))
    rows_a = run(cfg, tmp_path / "a", progress=False)
    rows_b = run(cfg, tmp_path / "b", progress=False)
    assert [r["round"] for r in rows_a] == [0, 1, 2]
    assert _stable(rows_a) == _stable(rows_b)
    for r in rows_a[1:]:
        assert r["bytes_up_per_client"] == r["bytes_down_per_client"] > 4 * 100_000
        assert len(r["clients"]) == 2
        for phase in ("time_train", "time_encode", "time_aggregate", "time_apply", "time_eval"):
            assert r[phase] >= 0
    assert rows_a[-1]["eval_loss"] < rows_a[0]["eval_loss"]
    on_disk = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert _stable(on_disk) == _stable(rows_a)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["before"]["eval_loss"] == rows_a[0]["eval_loss"]
    assert summary["after"]["eval_loss"] == rows_a[-1]["eval_loss"]
    a = load_file(tmp_path / "a" / "model.safetensors")
    assert summary["trainable_params"] == summary["model_params"]  # FedAvg trains everything
    assert summary["trainable_params"] == sum(t.numel() for t in a.values())
    assert (tmp_path / "a" / "config.yaml").is_file()
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args):
    return [sys.executable, "-m", "fedtune.cli", *args]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedzo", "fedkseed", "fedkseed_pro", "ferret",
                                    "federa"])
def test_kill_9_mid_round_then_resume_matches_uninterrupted(method, jsonl_data, tmp_path):
    """Bitwise, for every method: FedKSeed's client half checkpoints its own state (rebuilding
    from w0 would round differently from the live steps and undos)."""
    extra = {"method.k": 64} if method == "ferret" else {"method.k": 16} if "kseed" in method \
        else {"method.rank": 4} if method == "federa" else {}
    overrides = tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "federation.rounds": 3, "train.local_steps": 3, "eval.generate": False,
        "method.name": method, **extra})
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    run(load_config(BASE, overrides), ref_dir, progress=False)

    proc = subprocess.Popen(_cli("run", str(BASE), *overrides, "--out", str(killed_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait until round 2 has started (its first client reported), then kill -9 mid-round.
    seen = []
    deadline = time.time() + 300
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("round 2/3  client"):
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    rows_before = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_before] == [0, 1]  # round 2 was lost, round 1 kept
    assert not (killed_dir / "model.safetensors").exists()

    resumed = subprocess.run(_cli("run", "--resume", str(killed_dir), "--quiet"),
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr
    ref_rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert _stable(got_rows) == _stable(ref_rows)
    a = load_file(ref_dir / "model.safetensors")
    b = load_file(killed_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- bfloat16 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedavg", "fedit", "federa"])
def test_bfloat16_run_trains_and_stays_bfloat16(method, jsonl_data, tmp_path):
    """Two rounds through the in-process engine with model.dtype=bfloat16: the losses are
    finite, the trained weights moved, the model stayed bfloat16 (LoRA adapters: float32, peft's
    choice on a 16-bit base) and the server stayed float32 on the CPU."""
    from fedtune import experiment as ex
    from fedtune.engines.inprocess import LocalTransport
    from fedtune.engines.rounds import Progress, federate
    from fedtune.methods.base import trainable_parameters, trainable_state

    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "model.dtype": "bfloat16", "method.name": method, "eval.generate": False,
        **({"method.rank": 4, "train.lr": 0.05} if method != "fedavg" else {})}))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    w0 = trainable_state(model)
    rows = federate(exp, server, client, LocalTransport(exp, client, Progress(False)),
                    tmp_path / "run", out=Progress(False))
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows[1:])
    trained = trainable_parameters(model)
    assert any(not torch.equal(p.detach(), w0[n]) for n, p in trained.items())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if method == "fedavg":
        assert not frozen and {p.dtype for p in trained.values()} == {torch.bfloat16}
        assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    else:
        assert {p.dtype for p in frozen} == {torch.bfloat16}
        assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {(t.dtype, t.device.type) for t in server.weights.values()} == {(torch.float32, "cpu")}
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(saved[n], p.detach()) for n, p in trained.items())


@pytest.mark.parametrize("method", ["ferret", "fedkseed", "fedkseed_pro", "fedzo"])
def test_bfloat16_run_of_the_seed_based_methods(method, jsonl_data, tmp_path):
    """The seed-based methods in bfloat16 through the in-process engine: finite losses, the
    weights moved and stayed bfloat16; Ferret's server rebuilds bit for bit the model a client
    syncs to (the same fused reconstruction, rounded once into bfloat16 on both sides)."""
    from fedtune import experiment as ex
    from fedtune.engines.inprocess import LocalTransport
    from fedtune.engines.rounds import Progress, federate
    from fedtune.methods.base import trainable_parameters, trainable_state

    extra = {"method.k": 64} if method == "ferret" else {"method.k": 16} if "kseed" in method \
        else {}
    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "model.dtype": "bfloat16", "method.name": method, "eval.generate": False, **extra}))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    w0 = trainable_state(model)
    rows = federate(exp, server, client, LocalTransport(exp, client, Progress(False)),
                    tmp_path / "run", out=Progress(False))
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    trained = trainable_parameters(model)
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}
    assert any(not torch.equal(p.detach(), w0[n]) for n, p in trained.items())
    if method == "ferret":
        fresh = ex.build_client(exp, ex.build_model(exp))
        fresh.sync(server.download(server.round, None))
        for n, p in trainable_parameters(fresh.model).items():
            assert torch.equal(p.detach().view(torch.int16), server.weights[n].view(torch.int16))


def test_bfloat16_evaluation_loss_is_computed_in_float32(jsonl_data, tmp_path):
    """The loss of a bfloat16 model is the float32 cross-entropy of its upcast logits (summed in
    float64), and close to the float32 model's."""
    import torch.nn.functional as F

    from fedtune import experiment as ex
    from fedtune.evaluation import evaluation_loss
    from fedtune.tasks import IGNORE

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path, **{"model.dtype": dtype}))
        exp = ex.setup(cfg)
        model = ex.build_model(exp)
        losses[dtype] = evaluation_loss(model, exp.task, exp.test, batch_size=5)
        batch = exp.task.collate(exp.test[:5])
        parts = exp.task.token_losses(model, batch)
        assert parts.dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.bfloat16
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                         batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert torch.allclose(parts[0], ce, rtol=1e-6)
    assert parts[1] == (batch["labels"][:, 1:] != IGNORE).sum()
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fedavg", "federa"])
def test_gpu_run_keeps_the_model_on_the_gpu(method, jsonl_data, tmp_path):
    from fedtune import experiment as ex
    from fedtune.engines.inprocess import LocalTransport
    from fedtune.engines.rounds import Progress, federate

    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "model.device": "cuda", "model.dtype": "bfloat16", "method.name": method,
        **({"method.rank": 4} if method != "fedavg" else {})}))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    rows = federate(exp, server, client, LocalTransport(exp, client, Progress(False)),
                    tmp_path / "run", out=Progress(False))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {t.device.type for t in server.weights.values()} == {"cpu"}
    assert all(math.isfinite(r["eval_loss"]) for r in rows) and "rouge_l" in rows[-1]
    assert rows[-1]["peak_gpu_mb"] > 0


# --- failures contained -------------------------------------------------------------------------


def _federation(jsonl_data, tmp_path, name, **extra):
    from fedtune import experiment as ex
    from fedtune.engines.inprocess import LocalTransport
    from fedtune.engines.rounds import Progress

    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "method.name": "fedavg", "federation.clients_per_round": 1.0, "eval.generate": False,
        **extra}))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    return exp, model, client, server, LocalTransport(exp, client, Progress(False)), \
        tmp_path / name


@pytest.mark.parametrize("method", ["fedavg", "ferret"])
def test_a_bad_upload_and_a_non_finite_client_are_rejected_and_the_round_goes_on(
        method, jsonl_data, tmp_path, monkeypatch):
    """Client 1's training hits a non-finite loss and client 2's upload is cut by one byte:
    both are listed under ``rejected`` with the reason, the others are aggregated, and the
    global model is exactly the one of a federation where clients 1 and 2 never answered."""
    from fedtune.engines.rounds import federate
    from fedtune.methods.base import trainable_parameters
    from fedtune.methods.training import NonFiniteLossError

    extra = {"method.k": 64} if method == "ferret" else {}
    exp, model, client, server, transport, run_dir = _federation(
        jsonl_data, tmp_path, "bad", **{"method.name": method, **extra})
    real_fit = client.fit

    def fit(down, data, ctx):
        if ctx.client_id == 1:
            raise NonFiniteLossError(f"client 1 round {ctx.round} step 0: loss is nan")
        payload = real_fit(down, data, ctx)
        return payload[:-1] if ctx.client_id == 2 else payload

    monkeypatch.setattr(client, "fit", fit)
    rows = federate(exp, server, client, transport, run_dir)
    for row in rows[1:]:
        assert row["clients"] == [0, 3]
        reasons = {x["client"]: x["reason"] for x in row["rejected"]}
        assert set(reasons) == {1, 2}
        assert "loss is nan" in reasons[1] and "client 2" in reasons[2]
    bad = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}

    exp, model, client, server, transport, run_dir = _federation(
        jsonl_data, tmp_path, "silent", **{"method.name": method, **extra})
    real = transport.fit_round
    monkeypatch.setattr(transport, "fit_round", lambda r, downs: real(
        r, {c: d for c, d in downs.items() if c not in (1, 2)}))
    rows = federate(exp, server, client, transport, run_dir)
    assert all(row["dropped"] == [1, 2] and row["rejected"] == [] for row in rows[1:])
    assert all(torch.equal(p.detach(), bad[n]) for n, p in trainable_parameters(model).items())


def test_too_few_acceptable_uploads_stop_the_run_and_keep_the_checkpoint(jsonl_data, tmp_path,
                                                                          monkeypatch):
    from fedtune.engines.rounds import federate

    exp, _model, client, server, transport, run_dir = _federation(
        jsonl_data, tmp_path, "few", **{"federation.min_clients": 3, "federation.rounds": 2})
    real_fit = client.fit
    monkeypatch.setattr(client, "fit", lambda down, data, ctx: (
        real_fit(down, data, ctx)[:-1] if ctx.round == 1 and ctx.client_id < 2
        else real_fit(down, data, ctx)))
    with pytest.raises(RuntimeError, match=r"only 2 of 4 clients answered with an acceptable"):
        federate(exp, server, client, transport, run_dir)
    from fedtune.engines.rounds import run_identity
    from fedtune.runlog import RunLog

    assert RunLog(run_dir).load_checkpoint(run_identity(exp.cfg))["round"] == 1
