"""Byzantine-robust aggregation (``federation.aggregator``): the shared rule on hand-computed
values, the config refusals, and tiny federations with hostile clients.

The hostile clients train honestly and then rewrite their upload through the method's own
codec, in the space the server sums: their update scaled by 1e3, sign-flipped, or replaced by
noise 1e3 times its size. The stated distance is the honest clients' own spread: with fewer
than half hostile, every coordinate of the median aggregate must lie within the range of the
honest clients' values (so it is no farther from the honest-only aggregate than that range is
wide), while the weighted mean lands far outside it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedtune import experiment as ex
from fedtune.config import ConfigError, load_config
from fedtune.engines.inprocess import LocalTransport
from fedtune.engines.rounds import Progress, federate
from fedtune.methods import registry, robust

from . import hostile
from .conftest import BASE, tiny_overrides

# --- the rule ----------------------------------------------------------------------------------

X = [[1.0, 10.0, -3.0],
     [2.0, -20.0, 0.0],
     [100.0, 30.0, 1.0],
     [4.0, 0.0, 2.0],
     [5.0, 40.0, 1e6]]


def test_median_and_trimmed_mean_on_hand_computed_values():
    x = torch.tensor(X)
    assert robust.combine(x, robust.Rule("median")).tolist() == [4.0, 10.0, 1.0]
    # an even number of clients: the mean of the two middle values
    assert robust.combine(x[:4], robust.Rule("median")).tolist() == [3.0, 5.0, 0.5]
    # 5 clients, trim 0.2: one cut from each end
    got = robust.combine(x, robust.Rule("trimmed_mean", 0.2))
    assert torch.allclose(got, torch.tensor([11 / 3, 40 / 3, 1.0]))
    # trim 0.1 of 5 cuts floor(0.5) = 0: the unweighted mean
    got = robust.combine(x, robust.Rule("trimmed_mean", 0.1))
    assert torch.allclose(got, x.mean(dim=0))
    # 3 clients, trim 0.49: floor(1.47) = 1 cut from each end leaves the median
    assert robust.combine(x[:3], robust.Rule("trimmed_mean", 0.49)).tolist() == [2.0, 10.0, 0.0]
    assert robust.trimmed(3, 0.49) == 1 and robust.trimmed(10, 0.3) == 3


def test_the_rule_keeps_type_and_dtype_and_does_not_overflow():
    a = np.array(X)
    got = robust.combine(a, robust.Rule("median"))
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert got.tolist() == [4.0, 10.0, 1.0]
    big = torch.full((2, 3), 3e38)  # the float32 sum of two of these is inf
    for rule in (robust.Rule("median"), robust.Rule("trimmed_mean", 0.0)):
        out = robust.combine(big, rule)
        assert out.dtype == torch.float32 and torch.equal(out, big[0])


def test_rule_refuses_what_it_cannot_do():
    for name, trim in (("max", 0.0), ("trimmed_mean", 0.5), ("trimmed_mean", -0.1),
                       ("trimmed_mean", math.nan)):
        with pytest.raises(ValueError):
            robust.Rule(name, trim)
    with pytest.raises(ValueError, match="each method's own"):
        robust.combine(torch.zeros(2, 2), robust.MEAN)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, ".nan"])
def test_trim_outside_0_to_half_is_a_config_error(trim):
    with pytest.raises(ConfigError, match=r"federation.trim: .* must be in \[0, 0.5\)"):
        load_config(BASE, ["federation.aggregator=trimmed_mean", f"federation.trim={trim}"])


def test_ferret_paper_mode_is_refused_and_reference_mode_accepted():
    with pytest.raises(ConfigError, match=r"^federation.aggregator: median is not available for "
                       r"method.name=ferret: Ferret paper mode .* use method.mode=reference"):
        load_config(BASE, ["method.name=ferret", "method.mode=paper",
                           "federation.aggregator=median"])
    cfg = load_config(BASE, ["method.name=ferret", "method.mode=reference",
                             "federation.aggregator=median"])
    assert cfg.federation.aggregator == "median"
    load_config(BASE, ["method.name=ferret", "method.mode=paper"])  # mean: fine


def test_a_method_without_robust_support_is_refused_not_silently_averaged(monkeypatch):
    class PlainServer:  # a method registered from outside, knowing only the weighted mean
        pass

    spec = dataclasses.replace(registry.get_method("fedavg"), name="plain", method_id=250,
                               make_server=PlainServer)
    monkeypatch.setitem(registry.METHODS, "plain", spec)
    load_config(BASE, ["method.name=plain"])
    with pytest.raises(ConfigError, match="method.name=plain: its server implements only"):
        load_config(BASE, ["method.name=plain", "federation.aggregator=trimmed_mean"])


METHODS = {
    "fedavg": ({}, hostile.WeightsSpace(0, deltas=False)),
    "fedzo": ({}, hostile.WeightsSpace(0, deltas=True)),
    "fedit": ({"method.rank": 2}, hostile.WeightsSpace(32, deltas=False)),
    "federa": ({"method.rank": 2}, hostile.WeightsSpace(32, deltas=False)),
    "fedkseed": ({"method.k": 4, "train.local_steps": 4}, hostile.KSeedSpace()),
    "fedkseed_pro": ({"method.k": 4, "train.local_steps": 4}, hostile.KSeedSpace()),
    "ferret": ({"method.mode": "reference", "method.pool_size": 8}, hostile.FerretSpace()),
}


def hostile_federation(method, aggregator, attacks, data, tmp_path, trim=0.1, clients=7,
                       rounds=2):
    """Run a tiny federation where ``attacks[client]`` rewrites that client's upload; returns,
    per round, the server's state before and after in the method's summed space, every
    client's upload in that space and every client's example count."""
    extra, space = METHODS[method]
    cfg = load_config(BASE, tiny_overrides(
        data, tmp_path / "runs", **{
            "method.name": method, "partition.num_clients": clients,
            "federation.clients_per_round": 1.0, "federation.rounds": rounds,
            "federation.aggregator": aggregator, "federation.trim": trim,
            "eval.generate": False, "eval.max_examples": 4, "output.save_model": False,
            **extra}))
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    rounds_seen: list[dict] = []
    hostile.make_hostile(client, server, space, attacks, rounds_seen)
    rows = federate(exp, server, client, LocalTransport(exp, client, Progress(False)),
                    tmp_path / f"run-{aggregator}", out=Progress(False))
    assert all(row["rejected"] == [] and len(row["clients"]) == clients for row in rows[1:])
    states = [seen["before"] for seen in rounds_seen] + [space.vector(server)]
    for seen, after in zip(rounds_seen, states[1:]):
        seen["after"] = after
    return rounds_seen, rows


def honest_view(seen, attacks):
    """(lowest, highest, weighted mean) over the honest clients' uploads, coordinate-wise."""
    honest = [c for c in seen["up"] if c not in attacks]
    ups = np.stack([seen["up"][c] for c in honest])
    n = np.array([seen["n"][c] for c in honest], dtype=np.float64)
    return ups.min(axis=0), ups.max(axis=0), (n[:, None] * ups).sum(axis=0) / n.sum()


def within(x, lo, hi) -> bool:
    tol = 1e-6 * max(float(np.abs(lo).max()), float(np.abs(hi).max()), 1e-30)
    return bool(np.all(x >= lo - tol) and np.all(x <= hi + tol))


ATTACKS = {1: hostile.scaled, 3: hostile.flipped, 5: hostile.noise}
"""Three hostile clients of seven: fewer than half."""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_median_stays_within_the_honest_spread_where_mean_is_thrown_off(method, jsonl_data,
                                                                       tmp_path):
    """Clients 1, 3 and 5 of 7 are hostile. Mean: the aggregate leaves the honest range and
    lands more than 10 x the honest spread (the norm of max - min over the honest clients) from
    the honest-only weighted mean. Median, over two rounds: every coordinate within the
    honest range, hence within the honest spread of the honest-only mean."""
    mean_rounds, _ = hostile_federation(method, "mean", ATTACKS, jsonl_data, tmp_path, rounds=1)
    for seen in mean_rounds:
        lo, hi, honest = honest_view(seen, ATTACKS)
        spread = np.linalg.norm(hi - lo)
        assert spread > 0
        # what the test reads back is what the (unchanged) weighted mean summed
        n = np.array(list(seen["n"].values()), dtype=np.float64)
        ups = np.stack(list(seen["up"].values()))
        assert np.allclose(seen["after"], (n[:, None] * ups).sum(axis=0) / n.sum(),
                           rtol=1e-5, atol=1e-6 * np.abs(ups).max())
        assert not within(seen["after"], lo, hi)
        assert np.linalg.norm(seen["after"] - honest) > 10 * spread

    median_rounds, rows = hostile_federation(method, "median", ATTACKS, jsonl_data, tmp_path)
    for seen in median_rounds:
        lo, hi, honest = honest_view(seen, ATTACKS)
        assert within(seen["after"], lo, hi)
        assert np.linalg.norm(seen["after"] - honest) <= np.linalg.norm(hi - lo) * (1 + 1e-6)
        assert np.linalg.norm(seen["after"] - seen["before"]) > 0  # it did move
    assert all(math.isfinite(r["eval_loss"]) for r in rows)


@pytest.mark.parametrize("method", ["fedavg", "fedkseed", "ferret"])
def test_trimmed_mean_cutting_as_many_as_are_hostile_stays_within_the_honest_spread(
        method, jsonl_data, tmp_path):
    """trim 0.3 of 7 cuts 2 clients from each end: enough for two hostile ones."""
    attacks = {2: hostile.scaled, 4: hostile.noise}
    rounds, _ = hostile_federation(method, "trimmed_mean", attacks, jsonl_data, tmp_path,
                                   trim=0.3, rounds=1)
    (seen,) = rounds
    lo, hi, _ = honest_view(seen, attacks)
    assert within(seen["after"], lo, hi)
    # and it is the mean of the middle three, not the median
    ups = np.sort(np.stack(list(seen["up"].values())), axis=0)
    assert np.allclose(seen["after"], ups[2:5].mean(axis=0), rtol=1e-5,
                       atol=1e-6 * np.abs(ups).max())
