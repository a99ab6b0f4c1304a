"""The data layer: sources (Natural Instructions, instruction JSONL, Rotten Tomatoes) read into
raw example dicts, a train / held-out split, and partitioners that deal the training examples out
to clients. Everything random is seeded from the run seed (passed in) through
:func:`fedtune.randomness.derive_seed` with a constant salt per use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.config import DataConfig, PartitionConfig
from fedtune.data import partition as partitioners
from fedtune.data.errors import DataFileNotFoundError, DataFormatError
from fedtune.data.jsonl import read_jsonl
from fedtune.data.natural_instructions import read_natural_instructions
from fedtune.data.rotten_tomatoes import LABELS, load_rotten_tomatoes
from fedtune.randomness import derive_seed

__all__ = ["DataFileNotFoundError", "DataFormatError", "Dataset", "load_dataset", "partition"]

# Salts: one per random use of the run seed, so the uses are independent of each other.
SALT_SAMPLE = 0xDA7A_0001  # Natural Instructions per-task sampling
SALT_SPLIT = 0xDA7A_0002  # train / held-out split
SALT_SHUFFLE = 0xDA7A_0003  # shuffling (then capping) the training set
SALT_SHUFFLE_TEST = 0xDA7A_0005  # shuffling the held-out set
SALT_PARTITION = 0xDA7A_0004  # client partition


@dataclass
class Dataset:
    train: list[dict]
    test: list[dict]
    """Held-out examples, shuffled (so any prefix is a fair sample for evaluation)."""
    labels: list[str] | None
    """Class names by index for labelled data (Rotten Tomatoes), else None."""


def _split(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) with ``round(fraction * n)`` (at least 1) random examples held out."""
    n = len(examples)
    n_test = max(1, round(fraction * n))
    if n_test >= n:
        raise DataFormatError(f"data.test_fraction {fraction} leaves no training examples out "
                              f"of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return [examples[i] for i in perm[n_test:]], [examples[i] for i in perm[:n_test]]


def _shuffled(examples: list[dict], seed: int) -> list[dict]:
    return [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))]


def load_dataset(d: DataConfig, seed: int) -> Dataset:
    """The training and held-out examples for ``d``, split, sampled and shuffled from the run
    ``seed``. Held out: the Natural Instructions
    test tasks (same filters, no fraction sampling); for JSONL the ``eval_category`` examples if
    set, else a random ``test_fraction``; for Rotten Tomatoes a random ``test_fraction``. The
    training set is shuffled and cut to ``max_examples`` if set."""
    labels = None
    if d.task == "classification" and d.source != "rotten_tomatoes":
        raise ValueError("data.task: classification needs data.source=rotten_tomatoes")
    split_seed = derive_seed(seed, SALT_SPLIT)
    if d.source == "rotten_tomatoes":
        train, test = _split(load_rotten_tomatoes(d.task), d.test_fraction, split_seed)
        labels = list(LABELS)
    elif d.source == "natural_instructions":
        if d.path is None:
            raise ValueError("data.path: required for data.source=natural_instructions")
        common = {"max_input_chars": d.max_input_chars, "min_task_size": d.min_task_size}
        train = read_natural_instructions(d.path, "train", task_fraction=d.task_fraction,
                                          seed=derive_seed(seed, SALT_SAMPLE), **common)
        test = read_natural_instructions(d.path, "test", **common)
        if not train or not test:
            raise DataFormatError(
                f"{d.path}: no {'training' if not train else 'test'} task has "
                f"{d.min_task_size} instances with inputs under {d.max_input_chars} characters; "
                "lower data.min_task_size or raise data.max_input_chars"
            )
    elif d.source == "jsonl":
        if d.path is None:
            raise ValueError("data.path: required for data.source=jsonl")
        examples = read_jsonl(d.path)
        if d.eval_category is not None:
            train = [e for e in examples if e["category"] != d.eval_category]
            test = [e for e in examples if e["category"] == d.eval_category]
            if not test or not train:
                cats = sorted({e["category"] for e in examples})
                raise DataFormatError(
                    f"data.eval_category {d.eval_category!r} must hold out some but not all "
                    f"examples of {d.path}; its categories are {cats}"
                )
        else:
            train, test = _split(examples, d.test_fraction, split_seed)
    else:
        raise ValueError(f"data.source {d.source!r} is not a known source")
    train = _shuffled(train, derive_seed(seed, SALT_SHUFFLE))[: d.max_examples]
    test = _shuffled(test, derive_seed(seed, SALT_SHUFFLE_TEST))
    return Dataset(train=train, test=test, labels=labels)


def partition(train: list[dict], p: PartitionConfig, seed: int) -> list[list[int]]:
    """Client index lists over ``train`` for ``p``, drawn from the run ``seed``. ``task`` makes
    one client per task (``num_clients`` is then the number of tasks); ``dirichlet`` is over
    ``category`` (the label for Rotten Tomatoes, the task category for Natural Instructions)."""
    seed = derive_seed(seed, SALT_PARTITION)
    if p.scheme == "task":
        return partitioners.by_task(train)
    if p.scheme == "dirichlet":
        return partitioners.dirichlet(train, p.num_clients, p.alpha, p.min_client_size, seed)
    if p.scheme == "iid":
        return partitioners.iid(train, p.num_clients, seed, p.min_client_size)
    raise ValueError(f"partition.scheme {p.scheme!r} is not a known scheme")
