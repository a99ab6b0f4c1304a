"""fedtune compare on two tiny runs (the table's numbers against metrics.jsonl by hand, the files
it writes) and the trivial baselines of the evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedtune import cli
from fedtune import experiment as ex
from fedtune.compare import CompareError, compare, human_bytes
from fedtune.config import load_config
from fedtune.engines.inprocess import run
from fedtune.evaluation import baselines, evaluate, majority_share, prompt_input, rouge_l
from fedtune.tasks import alpaca_prompt

from .conftest import BASE, tiny_overrides

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(shared_jsonl_data, tmp_path_factory) -> list[Path]:
    root, data = tmp_path_factory.mktemp("cmp"), shared_jsonl_data
    dirs = []
    for method, extra in [("fedavg", {}), ("fedit", {"method.rank": 4, "train.lr": 0.5})]:
        cfg = load_config(BASE, tiny_overrides(data, root, **{
            "method.name": method, "federation.rounds": 3, "eval.generate_every": 1, **extra}))
        run(cfg, root / method, progress=False)
        dirs.append(root / method)
    return dirs


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compare_writes_table_plots_and_report_with_the_runs_numbers(two_runs, tmp_path):
    report = compare(two_runs, tmp_path / "report")
    out = tmp_path / "report"
    for name in ("report.md", "table.md", "by_round.png", "by_bytes.png", "compare.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("by_round.png", "by_bytes.png"):
        assert (out / png).read_bytes()[:8] == PNG
    text = (out / "report.md").read_text()
    assert "](by_round.png)" in text and "](by_bytes.png)" in text
    assert (out / "table.md").read_text().strip() in text
    for run_dir, n in zip(two_runs, report.numbers):
        rows = _rows(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        trained = rows[1:]
        losses = [r["eval_loss"] for r in rows]
        up = sum(r["bytes_up_total"] for r in trained)
        down = sum(r["bytes_down_total"] for r in trained)
        client_rounds = sum(len(r["clients"]) for r in trained)
        assert n["method"] == run_dir.name and n["rounds"] == 3
        assert n["eval_loss_final"] == losses[-1]
        assert n["eval_loss_best"] == min(losses)
        assert n["eval_loss_best_round"] == losses.index(min(losses))
        assert n["bytes_up_total"] == up == summary["bytes_up_total"]
        assert n["bytes_down_total"] == down == summary["bytes_down_total"]
        assert client_rounds == 6  # 2 of 4 clients in each of 3 rounds
        assert n["bytes_up_per_client_round"] == up / client_rounds
        assert n["bytes_down_per_client_round"] == down / client_rounds
        assert n["rouge_l_final"] == rows[-1]["rouge_l"]
        assert n["wall_time_s"] == summary["wall_time_s"]
        assert n["peak_rss_mb"] == summary["peak_rss_mb"]
        row = next(line for line in (out / "table.md").read_text().splitlines()
                   if line.startswith(f"| {run_dir.name} |"))
        assert f"| {losses[-1]:.4f} |" in row
        assert f"| {human_bytes(up / client_rounds)} |" in row
        assert f"| {rows[-1]['rouge_l']:.3f} |" in row
    assert json.loads((out / "compare.json").read_text()) == report.numbers
    # FedIT's adapters are a small fraction of FedAvg's full weights.
    assert report.numbers[1]["bytes_up_total"] * 20 < report.numbers[0]["bytes_up_total"]


def test_compare_shows_baselines_and_unfinished_runs(two_runs, tmp_path):
    runs = []
    for src in two_runs:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        runs.append(dst)
    summary = json.loads((runs[0] / "summary.json").read_text())
    summary["baselines"] = {"rouge_l_copy": 0.6667, "rouge_l_empty": 0.0}
    (runs[0] / "summary.json").write_text(json.dumps(summary))
    (runs[1] / "summary.json").unlink()  # killed before the end
    rows = _rows(runs[1])
    report = compare(runs, tmp_path / "out")
    assert report.numbers[0]["rouge_l_copy"] == 0.6667
    # the unfinished run has no summary: its baselines come from its round-0 metrics
    assert report.numbers[1].get("rouge_l_copy") == rows[0].get("rouge_l_copy") is not None
    assert report.numbers[1]["finished"] is False
    assert report.numbers[1]["wall_time_s"] == pytest.approx(
        sum(r["time_round"] for r in rows[1:]) + rows[0]["time_eval"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Rouge-L of copying the input" in table and "| 0.667 |" in table
    assert "fedit (unfinished)" in table


def test_compare_refuses_a_folder_that_is_no_run(two_runs, tmp_path, capsys):
    with pytest.raises(CompareError, match="no metrics.jsonl"):
        compare([two_runs[0], tmp_path], tmp_path / "out")
    with pytest.raises(CompareError, match="twice"):
        compare([two_runs[0], two_runs[0]], tmp_path / "out")
    assert cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert cli.main(["compare", *map(str, two_runs), "--out", str(tmp_path / "o")]) == 0
    assert "fedavg" in capsys.readouterr().out


# --- baselines ---------------------------------------------------------------------------------


def test_prompt_input_inverts_the_template():
    assert prompt_input(alpaca_prompt("Do it.", "red blue")) == "red blue"
    assert prompt_input(alpaca_prompt("Do it.", "a\n\nb")) == "a\n\nb"
    assert prompt_input(alpaca_prompt("Do it.")) == ""


def test_instruction_baselines_are_empty_and_copied_answers(two_runs):
    cfg = load_config(two_runs[0] / "config.yaml")
    exp = ex.setup(cfg)
    got = baselines(exp.task, exp.test, cfg.eval)
    gen = exp.test[: cfg.eval.generate_examples]
    assert got["rouge_l_empty"] == 0.0
    # The input is "a b" and the answer "b": precision 1/2, recall 1, F = 2/3 on every example.
    assert got["rouge_l_copy"] == pytest.approx(2 / 3)
    assert got["rouge_l_copy"] == rouge_l([p["prompt"].split("### Input:\n")[1].split("\n")[0]
                                           for p in gen], [p["reference"] for p in gen])
    assert "accuracy_majority" not in got  # no labels
    with_b = evaluate(ex.build_model(exp), exp.task, exp.tokenizer, exp.test, cfg.eval,
                      generate_now=False, with_baselines=True)
    assert with_b["rouge_l_copy"] == got["rouge_l_copy"] and "rouge_l" not in with_b


def test_classification_and_labelled_baselines_are_majority_shares():
    from fedtune.tasks import ClassificationTask

    tok = SimpleNamespace(pad_token_id=0)
    task = ClassificationTask(tok, num_labels=2)
    examples = [{"input_ids": [1], "label": label} for label in [1, 0, 1, 1, 0, 1, 1, 0, 0, 0]]
    cfg_eval = SimpleNamespace(max_examples=8, generate=True, generate_examples=4,
                               rouge="rouge_score")
    # Of the first 8 (the evaluation set): five 1s, three 0s (of all 10: half).
    assert baselines(task, examples, cfg_eval) == {"accuracy_majority": 5 / 8}
    assert majority_share(["fresh", "rotten", "fresh"]) == pytest.approx(2 / 3)
    assert majority_share([]) == 0.0

    from fedtune.tasks import CausalLMTask

    lm = CausalLMTask(SimpleNamespace(pad_token_id=0, eos_token_id=1))
    refs = ["Fresh", "rotten", "fresh ", "fresh", "rotten", "rotten"]
    exs = [{"prompt": alpaca_prompt("Label it.", f"review {i}"), "reference": r}
           for i, r in enumerate(refs)]
    got = baselines(lm, exs, cfg_eval, labels=["rotten", "fresh"])
    assert got["accuracy_majority"] == 3 / 4  # over the 4 generated examples (all 6: half)
    assert got["rouge_l_empty"] == 0.0 and got["rouge_l_copy"] == 0.0
    off = SimpleNamespace(max_examples=8, generate=False, generate_examples=4, rouge="rouge")
    assert baselines(lm, exs, off, labels=["rotten", "fresh"]) == {}


# --- fedtune report ----------------------------------------------------------------------------


def test_report_prints_each_metric_beside_its_baselines(two_runs, tmp_path, capsys):
    rows = _rows(two_runs[0])
    assert cli.main(["report", str(two_runs[0])]) == 0
    out = capsys.readouterr().out
    assert (f"Rouge-L {rows[-1]['rouge_l']:.4f} after round 3; copying the input "
            f"{rows[0]['rouge_l_copy']:.4f}, an empty answer {rows[0]['rouge_l_empty']:.4f} "
            "(rouge-score RougeL F-measure (default tokenizer))") in out
    # A classifier's run, written by hand: accuracy 0.8 after 2 rounds, majority share 0.555.
    run_dir = tmp_path / "cls"
    run_dir.mkdir()
    hand = [{"round": 0, "eval_loss": 0.69, "accuracy": 0.5, "accuracy_majority": 0.555},
            {"round": 1, "eval_loss": 0.6, "accuracy": 0.7, "clients": [0]},
            {"round": 2, "eval_loss": 0.5, "accuracy": 0.8, "clients": [1]}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hand))
    assert cli.main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "accuracy 0.8000 after round 2; majority-label accuracy 0.5550" in out
    assert "Rouge-L" not in out.split("\n\n", 1)[1]  # no Rouge-L line for a classifier
    (run_dir / "metrics.jsonl").write_text(json.dumps(hand[0] | {"accuracy_majority": None}))
    assert cli.main(["report", str(run_dir)]) == 0
    assert "no majority-label baseline recorded" in capsys.readouterr().out


def test_run_ends_with_baselines_and_bytes_beside_fedavg(jsonl_data, tmp_path, capsys):
    out_dir = tmp_path / "r"
    items = tiny_overrides(jsonl_data, tmp_path, **{"method.name": "ferret", "method.k": 64,
                                                   "federation.rounds": 1,
                                                   "output.save_model": False})
    assert cli.main(["run", str(BASE), *items, "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out.split("\nrun folder:")[0].rsplit("\n\n", 1)[1]
    rows, summary = _rows(out_dir), json.loads((out_dir / "summary.json").read_text())
    up = rows[1]["bytes_up_total"] / len(rows[1]["clients"])
    fedavg = 4 * summary["model_params"]
    assert f"Rouge-L {rows[1]['rouge_l']:.4f} after round 1; copying the input " in text
    assert (f"bytes per client per round: {human_bytes(up)} up" in text
            and f"FedAvg would send the float32 weights, about {human_bytes(fedavg)} each way "
            f"({fedavg / up:,.0f}x this upload)" in text)
