"""The in-process engine end to end on a tiny model: metrics recorded, runs reproducible, a run
killed with SIGKILL in the middle of a round resumes to the same final model and metrics."""

from __future__ import annotations

import json
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

from .conftest import tiny_overrides

VOLATILE = ("time_", "peak_rss_mb")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_run_records_metrics_and_same_config_gives_same_numbers(jsonl_data, tmp_path):
    cfg = load_config(None, tiny_overrides(jsonl_data, tmp_path / "runs"))
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
def test_kill_9_mid_round_then_resume_matches_uninterrupted(jsonl_data, tmp_path):
    overrides = tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "federation.rounds": 3, "train.local_steps": 3, "eval.generate": False})
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    run(load_config(None, overrides), ref_dir, progress=False)

    proc = subprocess.Popen(_cli("run", *overrides, "--out", str(killed_dir)),
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
