"""Every mistake a user can make on the command line ends with one line and exit status 2, no
traceback, and no run folder written (issue 12's list)."""

from __future__ import annotations

import json

import pytest

from fedtune.cli import main

from .conftest import BASE, tiny_overrides


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "two.jsonl").write_text("".join(
        json.dumps({"instruction": "Repeat.", "input": "x", "output": "x"}) + "\n"
        for _ in range(2)))
    (tmp_path / "empty.yaml").write_text("")
    return tmp_path


CASES = {
    "binary data file": (["data.path={bin}"], "not UTF-8"),
    "two examples": (["data.path={two}"], "cannot give 4 clients"),
    "a thousand clients": (["partition.num_clients=1000"], "cannot give 1000 clients"),
    "test fraction 0.99": (["data.test_fraction=0.99"], "clients at least"),
    "tiny vocabulary": (["model.tiny_vocab=10"], "model.tiny_vocab"),
    "tiny hidden 30": (["model.tiny_hidden=30"], "multiple of 4"),
    "min clients 10": (["federation.min_clients=10"], "federation.min_clients"),
    "ferret k=2": (["method.name=ferret", "method.k=2"], "method.k >= "),
    "negative momentum": (["train.momentum=-1"], "train.momentum"),
    "server_lr nan": (["method.name=ferret", "method.server_lr=.nan"], "server_lr"),
    "group_factor nan": (["method.name=ferret", "method.group_factor=.nan"], "group_factor"),
    "negative generations": (["eval.generate_examples=-1"], "eval.generate_examples"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line_and_exit_status_2(case, files, jsonl_data, capsys):
    extra, message = CASES[case]
    base = tiny_overrides(jsonl_data, files / "runs", **{"federation.rounds": 1,
                                                         "eval.generate": "false"})
    items = base + [e.format(bin=files / "bin.jsonl", two=files / "two.jsonl") for e in extra]
    out = files / "out"
    assert main(["run", str(BASE), *items, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtune: error: ") and message in err[0], err
    assert not (out / "metrics.jsonl").exists()


def test_an_empty_config_file_and_a_cut_metrics_file_are_one_line(files, capsys, tmp_path):
    assert main(["run", str(files / "empty.yaml")]) == 2
    assert "is empty" in capsys.readouterr().err
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "eval_lo')
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:2" in err[0]
