"""The two Rouge-L scorers of ``eval.rouge`` on strings scored by hand, their empty cases, the
config value, and the scorer's name in a run's metrics, summary and comparison table."""

from __future__ import annotations

import json

import pytest

from fedtune.compare import compare
from fedtune.config import ConfigError, load_config
from fedtune.engines.inprocess import run
from fedtune.evaluation import SCORERS, rouge_l

from .conftest import BASE, tiny_overrides


def test_rouge_score_scorer_by_hand():
    # 6 tokens each; longest common subsequence "the cat on the mat", 5 tokens: P = R = 5/6.
    assert rouge_l(["the cat was on the mat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    # "x y z" against "x z": LCS 2, P = 2/3, R = 1, F = 2PR / (P + R) = 0.8.
    assert rouge_l(["x y z"], ["x z"], "rouge_score") == pytest.approx(0.8)
    # Its tokenizer lowercases and drops punctuation.
    assert rouge_l(["The Cat, sat!"], ["the cat sat"]) == pytest.approx(1.0)
    # The mean over pairs.
    assert rouge_l(["x y z", "a"], ["x z", "b"]) == pytest.approx(0.4)


def test_rouge_package_scorer_by_hand():
    # The rouge package counts each distinct word once: both texts have 5 (the, cat, on, mat and
    # was / sat); their LCS "the cat on the mat" holds 4 distinct words: P = R = F = 4/5.
    got = rouge_l(["the cat was on the mat"], ["the cat sat on the mat"], "rouge")
    assert got == pytest.approx(0.8, abs=1e-7)  # the package adds 1e-8 to a denominator
    assert rouge_l(["x y z"], ["x z"], "rouge") == pytest.approx(0.8, abs=1e-7)
    # Whitespace words, case and punctuation kept: no word in common.
    assert rouge_l(["The Cat, sat!"], ["the cat sat"], "rouge") == 0.0
    assert rouge_l(["x y z", "a"], ["x z", "b"], "rouge") == pytest.approx(0.4, abs=1e-7)


@pytest.mark.parametrize("scorer", ["rouge_score", "rouge"])
def test_empty_texts_score_zero(scorer):
    # The rouge package raises on these ("Hypothesis is empty.", "Reference is empty."); the
    # pair shares no words, so it scores 0 like rouge-score does.
    for pred, ref in [("", "a b"), ("a b", ""), ("...", "a b"), ("", "")]:
        assert rouge_l([pred], [ref], scorer) == 0.0
    assert rouge_l(["", "x z"], ["a", "x z"], scorer) == pytest.approx(0.5, abs=1e-7)
    assert rouge_l([], [], scorer) == 0.0


def test_an_unknown_scorer_is_refused(jsonl_data):
    with pytest.raises(ValueError, match="unknown Rouge scorer 'bleu'"):
        rouge_l(["a"], ["a"], "bleu")
    assert load_config(BASE, tiny_overrides(jsonl_data, **{"eval.rouge": "rouge"})).eval.rouge \
        == "rouge"
    assert load_config(BASE, tiny_overrides(jsonl_data)).eval.rouge == "rouge_score"
    with pytest.raises(ConfigError, match=r"eval\.rouge: 'bleu' is not allowed; use one of "
                                          r"'rouge_score', 'rouge'"):
        load_config(BASE, tiny_overrides(jsonl_data, **{"eval.rouge": "bleu"}))


def test_a_run_names_its_scorer_everywhere(jsonl_data, tmp_path):
    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path, **{
        "eval.rouge": "rouge", "federation.rounds": 1, "output.save_model": False}))
    run(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert rows[0]["rouge_scorer"] == summary["rouge_scorer"] == SCORERS["rouge"]
    # The baselines were scored with it too: copying "a b" for the answer "b" is, in distinct
    # words, P = 1/2, R = 1, F = 2/3 (as with rouge-score).
    assert rows[0]["rouge_l_copy"] == pytest.approx(2 / 3, abs=1e-7)
    report = compare([tmp_path / "run"], tmp_path / "out")
    assert f"Rouge-L: {SCORERS['rouge']}." in report.table_text
    assert f"Rouge-L: {SCORERS['rouge']}." in (tmp_path / "out" / "table.md").read_text()
    assert f"Rouge-L: {SCORERS['rouge']}." in (tmp_path / "out" / "report.md").read_text()
