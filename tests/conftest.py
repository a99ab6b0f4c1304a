"""Shared fixtures: a small instruction JSONL data set and a tiny-model experiment config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NI_PATH = SHARED / "data" / "natural-instructions"

TEST_DEVICE = os.environ.get("FEDTUNE_TEST_DEVICE", "cpu")
"""model.device of the tiny experiments (``FEDTUNE_TEST_DEVICE=cuda make test`` runs them on a
GPU); pinned so that the suite does the same on a machine with a GPU as on one without."""

BASE = REPO / "tests" / "base.yaml"
"""The experiment tests override (``load_config(BASE, overrides)``, ``fedtune run BASE ...``): a
causal LM instruction run, pinned here rather than taken from the demo default."""

WORDS = ["red", "blue", "green", "small", "large", "quick", "slow", "bright", "dark", "warm"]


def write_words_jsonl(path: Path) -> Path:
    """120 Alpaca-shaped examples in 3 categories; the answer (the input's second word) is a
    function of the input, so a model can learn it."""
    with path.open("w") as f:
        for i in range(120):
            a, b = WORDS[i % 10], WORDS[(3 * i + 1) % 10]
            f.write(json.dumps({
                "instruction": "Repeat the second word.",
                "input": f"{a} {b}",
                "output": b,
                "category": ["colour", "size", "speed"][i % 3],
            }) + "\n")
    return path


@pytest.fixture
def jsonl_data(tmp_path: Path) -> Path:
    """:func:`write_words_jsonl` in this test's own folder."""
    return write_words_jsonl(tmp_path / "data.jsonl")


@pytest.fixture(scope="session")
def shared_jsonl_data(tmp_path_factory) -> Path:
    """:func:`write_words_jsonl` once for the session, for module-scoped run fixtures (tests
    must not write to it)."""
    return write_words_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl")


def tiny_overrides(data_path: Path, run_dir: Path | None = None, **extra) -> list[str]:
    items = {
        "model.source": "tiny",
        "model.device": TEST_DEVICE,
        "model.tiny_hidden": 32,
        "data.source": "jsonl",
        "data.path": str(data_path),
        "data.max_length": 48,
        "partition.scheme": "dirichlet",
        "partition.num_clients": 4,
        "partition.alpha": 1.0,
        "federation.rounds": 2,
        "federation.clients_per_round": 0.5,
        "train.local_steps": 2,
        "train.batch_size": 4,
        "train.lr": 0.05,
        "eval.max_examples": 12,
        "eval.generate_examples": 4,
        "eval.max_new_tokens": 3,
        "output.dir": str(run_dir or data_path.parent / "runs"),
        "method.name": "fedavg",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
