"""Checkpoints are verified: a damaged newest one falls back to the one before, a damaged pair,
another run's checkpoint or one of another randomness version stops the resume with one line
(exit status 2 from the command line), and nothing is resumed silently."""

from __future__ import annotations

import io

import pytest
import torch

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.engines.inprocess import run
from fedtune.runlog import CHECKPOINT_MAGIC, CheckpointError, RunLog

from .conftest import BASE, tiny_overrides

ID = {"method": "fedavg", "seed": 0}


def _log(tmp_path) -> RunLog:
    log = RunLog(tmp_path / "run")
    log.save_checkpoint({"round": 1, "w": torch.arange(4.0)}, ID)
    log.save_checkpoint({"round": 2, "w": torch.arange(4.0) * 2}, ID)
    return log


def test_the_newest_checkpoint_is_loaded_and_the_one_before_is_kept(tmp_path):
    log = _log(tmp_path)
    assert log.load_checkpoint(ID)["round"] == 2
    assert log.previous_path.exists()
    assert RunLog(tmp_path / "empty").load_checkpoint(ID) is None


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    log = _log(tmp_path)
    data = bytearray(log.checkpoint_path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 3]
    log.checkpoint_path.write_bytes(bytes(data))
    state = log.load_checkpoint(ID)
    assert state["round"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert "damaged" in capsys.readouterr().err
    log.previous_path.write_bytes(log.previous_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no intact checkpoint is left"):
        log.load_checkpoint(ID)


def test_another_runs_or_an_old_release_checkpoint_is_refused(tmp_path):
    log = _log(tmp_path)
    with pytest.raises(CheckpointError, match="belongs to another run: its method is"):
        log.load_checkpoint({"method": "ferret", "seed": 0})
    old = RunLog(tmp_path / "old")
    buf = io.BytesIO()
    torch.save({"round": 1}, buf)  # a release before randomness v3: no magic, no version
    old.checkpoint_path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="randomness v2"):
        old.load_checkpoint(ID)
    assert log.checkpoint_path.read_bytes().startswith(CHECKPOINT_MAGIC)


def test_resuming_from_a_damaged_run_is_one_line_and_exit_status_2(jsonl_data, tmp_path,
                                                                   capsys):
    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs",
                                           **{"eval.generate": False}))
    run(cfg, tmp_path / "r", progress=False)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = tmp_path / "r" / name
        path.write_bytes(path.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtune: error: ")
    assert "damaged" in err[0] and "cannot resume" in err[0]


def test_run_folders_are_not_overwritten_or_shared(jsonl_data, tmp_path, capsys):
    import fcntl

    from fedtune.runlog import RunFolderError

    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "eval.generate": False, "federation.rounds": 1}))
    out = tmp_path / "r"
    run(cfg, out, progress=False)
    first = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="holds a run"):
        run(cfg, out, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == first  # untouched
    capsys.readouterr()
    items = [f"{k}" for k in tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "eval.generate": "false", "federation.rounds": 1})]
    assert main(["run", str(BASE), *items, "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["run", str(BASE), *items, "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "checkpoint.prev.pt").exists()  # the old run's files went first
    # a second writer while one holds the folder
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunFolderError, match="another fedtune process"):
            run(cfg, out, resume=True, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        run(cfg, tmp_path / "file", progress=False)
