"""Partitioners: split a list of raw examples into clients, as a list of index lists (one per
client, each sorted). Every index goes to exactly one client, and the split is a pure function of
the examples and the seed (a local ``numpy.random.default_rng``, never global RNG state)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedtune.data.errors import DataFormatError

MAX_TRIES = 1000
"""Dirichlet draws tried before giving up on ``min_client_size``."""


def by_task(examples: Sequence[dict]) -> list[list[int]]:
    """One client per distinct ``task`` value, clients in sorted task order."""
    clients: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if "task" not in ex:
            raise DataFormatError(f"example {i} has no 'task' key; partition.scheme=task needs "
                             "Natural Instructions data (data.source=natural_instructions)")
        clients.setdefault(ex["task"], []).append(i)
    return [clients[t] for t in sorted(clients)]


def iid(examples: Sequence[dict], num_clients: int, seed: int,
        min_client_size: int = 1) -> list[list[int]]:
    """A uniformly random split into ``num_clients`` clients whose sizes differ by at most 1."""
    n = len(examples)
    _check_sizes(n, num_clients, min_client_size)
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(perm, num_clients)]


def dirichlet(examples: Sequence[dict], num_clients: int, alpha: float, min_client_size: int,
              seed: int, key: str = "category") -> list[list[int]]:
    """Label-skewed split (the NIID-Bench scheme FedKSeed and Ferret use): for each ``key`` value,
    draw client proportions from Dirichlet(alpha) and deal that value's shuffled examples out in
    those proportions. Smaller alpha, more skew. As in NIID-Bench a client already holding more
    than its fair share (n / num_clients) gets no more, and the whole draw is repeated until
    every client has ``min_client_size`` examples (at most :data:`MAX_TRIES` draws)."""
    n = len(examples)
    _check_sizes(n, num_clients, min_client_size)
    if alpha <= 0:
        raise DataFormatError(f"alpha {alpha} must be positive")
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(str(ex.get(key, "")), []).append(i)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_TRIES):
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for value in sorted(groups):
            idx = rng.permutation(groups[value])
            p = rng.dirichlet(np.full(num_clients, alpha))
            open_ = np.array([len(c) < n / num_clients for c in clients])
            if (p * open_).sum() > 0:
                p = p * open_
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for client, part in zip(clients, np.split(idx, cuts)):
                client.extend(part.tolist())
        if min(len(c) for c in clients) >= min_client_size:
            return [sorted(c) for c in clients]
    raise DataFormatError(
        f"Dirichlet(alpha={alpha}) over {len(groups)} {key} values did not give all "
        f"{num_clients} clients at least {min_client_size} of the {n} examples in {MAX_TRIES} "
        "draws; raise partition.alpha, or lower partition.num_clients or "
        "partition.min_client_size"
    )


def _check_sizes(n: int, num_clients: int, min_client_size: int) -> None:
    if num_clients < 1:
        raise DataFormatError(f"num_clients {num_clients} must be at least 1")
    if num_clients * min_client_size > n:
        raise DataFormatError(
            f"cannot give {num_clients} clients at least {min_client_size} examples each from "
            f"{n} examples; lower partition.num_clients or partition.min_client_size, or use "
            "more data"
        )
