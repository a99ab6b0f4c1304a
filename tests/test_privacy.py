"""Client-level differential privacy (``privacy:``): the config refusals, the clip bound of
every method's upload decoded in its own space, the noise's scale, epsilon against
dp-accounting's own numbers, target_epsilon, and a private run killed with SIGKILL resuming to
the same model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from safetensors.torch import load_file

from fedtune import experiment as ex
from fedtune import wire
from fedtune.config import ConfigError, load_config
from fedtune.engines.inprocess import LocalTransport, run
from fedtune.engines.rounds import Progress, federate, summary_table
from fedtune.methods import fedavg, fedkseed, privacy
from fedtune.methods.base import Upload
from fedtune.methods.ferret import (
    Config as FerretConfig,
)
from fedtune.methods.ferret import (
    FerretClient,
    FerretServer,
    decode_upload_body,
    encode_upload_body,
)

from .conftest import BASE, tiny_overrides
from .test_engine import _cli, _stable

# --- config ------------------------------------------------------------------------------------

ON = ["privacy.enabled=true", "method.name=fedavg"]


@pytest.mark.parametrize("overrides, message", [
    (["privacy.clip_norm=0", "privacy.noise_multiplier=1"], r"privacy.clip_norm: 0.0 must be"),
    (["privacy.clip_norm=-1", "privacy.noise_multiplier=1"], r"privacy.clip_norm: -1.0 must be"),
    (["privacy.noise_multiplier=-0.1"], r"privacy.noise_multiplier: -0.1 must be a number >= 0"),
    (["privacy.noise_multiplier=1", "privacy.delta=0"], r"privacy.delta: 0.0 must be in \(0, 1\)"),
    (["privacy.noise_multiplier=1", "privacy.delta=1"], r"privacy.delta: 1.0 must be in \(0, 1\)"),
    (["privacy.noise_multiplier=1", "privacy.delta=1.5"], r"privacy.delta: 1.5 must be in"),
    (["privacy.target_epsilon=0"], r"privacy.target_epsilon: 0.0 must be a positive number"),
    (["privacy.noise_multiplier=1", "privacy.target_epsilon=4"],
     r"give noise_multiplier or target_epsilon, not both"),
    ([], r"set privacy.noise_multiplier or privacy.target_epsilon"),
    (["privacy.noise_multiplier=1", "federation.aggregator=median"],
     r"federation.aggregator=median is refused with privacy"),
    (["privacy.noise_multiplier=1", "method.name=ferret", "method.mode=paper"],
     r"method.name=ferret: Ferret paper mode .* privacy.noise=local"),
    (["privacy.noise_multiplier=1", "method.wire_dtype=bfloat16"],
     r"method.wire_dtype=bfloat16: 16-bit rounding"),
])
def test_bad_privacy_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(BASE, ON + overrides)
    assert "\n" not in str(e.value)


def test_privacy_is_off_by_default_and_good_settings_load():
    assert load_config(None, []).privacy.enabled is False  # the embedded default too
    assert load_config(BASE, []).privacy.enabled is False
    cfg = load_config(BASE, ON + ["privacy.target_epsilon=4", "method.name=ferret",
                                  "method.mode=paper", "privacy.noise=local"])
    assert cfg.privacy.noise == "local"


# --- the clip bound, every method --------------------------------------------------------------

C = 1e-4  # far below every method's update on the tiny model, so the clip always binds


def _weights_norm(server, payload, round_, deltas):
    tensors = server.decode(payload, round_)
    return privacy.norm((t.double() if deltas else t.double() - server.weights[n].double())
                        for n, t in tensors.items())


def _kseed_norm(server, payload, round_):
    idx, g = fedkseed.decode_upload(server.method_id, payload, round_, server.k, server.pool_id)
    return privacy.norm([np.bincount(idx, weights=g, minlength=server.k)])


def _ferret_norm(server, payload, round_):
    _, body = wire.unframe(payload, method_id=server.method_id, kind=wire.UP, round_=round_)
    return privacy.norm([decode_upload_body(server.cfg, server.layout, body).coords])


SPACES = {
    # FedAvg's full model: a bound 1e-4 would be only 4000 float32 roundings of the weights'
    # norm (~30), a margin of 3% (methods.privacy.Mechanism.factor); 1e-3 still binds
    "fedavg": ({"privacy.clip_norm": 1e-3}, lambda s, p, r: _weights_norm(s, p, r, False)),
    "fedzo": ({}, lambda s, p, r: _weights_norm(s, p, r, True)),
    "fedit": ({"method.rank": 2}, lambda s, p, r: _weights_norm(s, p, r, False)),
    "federa": ({"method.rank": 2}, lambda s, p, r: _weights_norm(s, p, r, False)),
    "fedkseed": ({"method.k": 16, "train.local_steps": 4}, _kseed_norm),
    "fedkseed_pro": ({"method.k": 16, "train.local_steps": 4}, _kseed_norm),
    "ferret-reference": ({"method.name": "ferret", "method.mode": "reference",
                          "method.pool_size": 8}, _ferret_norm),
    # paper mode takes local noise only; with a zero multiplier the upload is just clipped
    "ferret-paper": ({"method.name": "ferret", "method.k": 64, "privacy.noise": "local",
                      "privacy.noise_multiplier": 0.0}, _ferret_norm),
}


@pytest.mark.parametrize("method", list(SPACES))
def test_every_upload_decoded_in_its_space_is_within_the_clip_norm(method, jsonl_data,
                                                                   tmp_path):
    extra, measure = SPACES[method]
    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "method.name": method, "privacy.enabled": True, "privacy.clip_norm": C,
        "privacy.noise_multiplier": 1.0, "eval.generate": False, "eval.max_examples": 4,
        "output.save_model": False, **extra}))
    bound = cfg.privacy.clip_norm
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client, server = ex.build_client(exp, model), ex.build_server(exp, model)
    norms = []
    real_fit = client.fit

    def fit(download, data, ctx):
        payload = real_fit(download, data, ctx)
        norms.append(measure(server, payload, ctx.round))
        return payload

    client.fit = fit
    federate(exp, server, client, LocalTransport(exp, client, Progress(False)),
             tmp_path / "run", out=Progress(False))
    assert len(norms) == 4  # 2 rounds x 2 clients
    assert max(norms) <= bound * (1 + 1e-6), norms
    # the clip bound itself, not a smaller update (the weights methods aim a float32 rounding
    # of the global under it)
    assert min(norms) >= bound * 0.99, norms


def test_the_private_mean_is_unweighted_over_the_clients_sampled():
    """Example counts are ignored and the denominator is m even when a client is missing."""
    server = fedavg.WeightsServer(fedavg.Config(), {"w": torch.zeros(3)}, 0, "examples")
    server.privacy = privacy.Mechanism(10.0, 0.0, "central", 0, per_round=3)
    ups = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]

    def upload(cid, n, t, r=0):
        body = wire.tensor_parts({"w": t})
        return Upload(cid, n, wire.frame(fedavg.METHOD_ID, wire.UP, r, body))

    server.aggregate(0, [upload(0, 1, ups[0]), upload(1, 1000, ups[1])])
    assert torch.allclose(server.weights["w"], torch.tensor([1 / 3, 2 / 3, 0.0]))
    # and a delta over the bound is clipped by the server in central mode
    server.aggregate(1, [upload(0, 1, server.weights["w"] + torch.tensor([0.0, 0.0, 300.0]),
                                1)])
    assert torch.allclose(server.weights["w"], torch.tensor([1 / 3, 2 / 3, 10 / 3]))


# --- the noise ---------------------------------------------------------------------------------


def _check_scale(x: np.ndarray, std: float) -> None:
    """Sample mean and standard deviation of ``len(x)`` independent draws of N(0, std^2),
    each within 5 standard errors (std / sqrt(n) and std / sqrt(2n))."""
    n = x.size
    assert abs(x.mean()) < 5 * std / math.sqrt(n)
    assert abs(x.std() - std) < 5 * std / math.sqrt(2 * n), (x.std(), std)


SIGMA, CLIP, M = 1.5, 2.0, 3


def test_central_noise_on_fedkseed_per_seed_sums_has_the_stated_scale():
    cfg = fedkseed.Config(k=8192)

    def server():
        s = fedkseed.KSeedServer(cfg, None, 7, "examples")
        s.privacy = privacy.Mechanism(CLIP, SIGMA, "central", 7, per_round=M)
        return s

    s = server()

    def empty(r, c):
        return Upload(c, 1, fedkseed.encode_upload(fedkseed.METHOD_ID, r, s.pool_id,
                                                   np.zeros(0, np.int64), np.zeros(0)))

    s.aggregate(0, [empty(0, c) for c in range(M)])
    first = s.acc * M  # the per-seed sums the server broadcasts: noise alone here
    _check_scale(first, SIGMA * CLIP)
    s.aggregate(1, [empty(1, c) for c in range(M)])
    second = s.acc * M - first
    _check_scale(second, SIGMA * CLIP)
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / math.sqrt(first.size)  # fresh per round
    again = server()
    again.aggregate(0, [empty(0, c) for c in range(M)])
    assert np.array_equal(again.acc * M, first)  # (run seed, round) gives the same noise


def test_central_noise_on_weights_has_the_stated_scale():
    s = fedavg.WeightsServer(fedavg.Config(), {"a": torch.zeros(100, 150), "b": torch.ones(50)},
                             0, "examples")
    s.privacy = privacy.Mechanism(CLIP, SIGMA, "central", 3, per_round=M)
    same = wire.frame(fedavg.METHOD_ID, wire.UP, 0, wire.tensor_parts(s.weights))
    s.aggregate(0, [Upload(c, 1, same) for c in range(M)])  # every delta zero
    noise = torch.cat([s.weights["a"].view(-1), s.weights["b"] - 1]).double().numpy() * M
    _check_scale(noise, SIGMA * CLIP)


def test_central_noise_on_ferret_reference_table_has_the_stated_scale():
    cfg = FerretConfig(mode="reference", pool_size=100, clip_norm=0.0)
    s = FerretServer(cfg, {"a": torch.zeros(40, 30), "b": torch.zeros(1200)}, 5, "examples")
    s.privacy = privacy.Mechanism(CLIP, SIGMA, "central", 5, per_round=M)
    counts = [2] * len(s.layout)
    body = encode_upload_body(cfg, s.layout, 11, counts, [0.0] * sum(counts))
    s.aggregate(0, [Upload(c, 1, wire.frame(s.method_id, wire.UP, 0, body)) for c in range(M)])
    assert s.mode.table.size == 100 * len(s.layout)
    _check_scale(s.mode.table * M, SIGMA * CLIP)


def test_local_noise_of_fedkseed_and_ferret_uploads_has_the_stated_scale():
    """The clients' own code: the upload minus its noiseless clipped version."""
    k = 8192
    rng = np.random.default_rng(0)
    idx, g = rng.integers(0, k, 300), rng.normal(0, 50, 300)
    local = SimpleNamespace(k=k, privacy=privacy.Mechanism(CLIP, SIGMA, "local", 0, M))
    clean = SimpleNamespace(k=k, privacy=privacy.Mechanism(CLIP, 0.0, "local", 0, M))
    got_i, got = fedkseed.KSeedClient.private_sums(local, idx, g, seed=42)
    ref_i, ref = fedkseed.KSeedClient.private_sums(clean, idx, g, seed=42)
    assert np.array_equal(got_i, np.arange(k)) and np.array_equal(ref_i, np.arange(k))
    assert privacy.norm([ref]) <= CLIP * (1 + 1e-6)
    _check_scale(got - ref, SIGMA * CLIP)
    coords = rng.normal(0, 10, 10_000).tolist()
    noisy = np.array(FerretClient.private_coords(local, coords, seed=43))
    plain = np.array(FerretClient.private_coords(clean, coords, seed=43))
    _check_scale(noisy - plain, SIGMA * CLIP)
    other = np.array(FerretClient.private_coords(local, coords, seed=44))
    assert not np.array_equal(other, noisy)  # each client round its own noise


# --- the accountant ----------------------------------------------------------------------------


def _library_epsilon(sampling, noise, n, m, sigma, rounds, delta):
    """dp-accounting's RDP accountant called directly for the mechanism the docs describe."""
    if sampling == "fixed":
        acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        step = dpa.GaussianDpEvent(sigma / 2)  # replace-one: sensitivity 2C
        if noise == "central":
            step = dpa.SampledWithoutReplacementDpEvent(n, m, step)
    else:
        acc = rdp.RdpAccountant()
        step = dpa.GaussianDpEvent(sigma)
        if noise == "central":
            step = dpa.PoissonSampledDpEvent(m / n, step)
    return acc.compose(dpa.SelfComposedDpEvent(step, rounds)).get_epsilon(delta)


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
@pytest.mark.parametrize("noise", ["central", "local"])
def test_epsilon_is_dp_accountings_own_value(sampling, noise):
    acc = privacy.Accounting(1.3, 20, 5, 1e-5, sampling, noise)
    for rounds in (1, 7, 40):
        assert acc.epsilon(rounds) == pytest.approx(
            _library_epsilon(sampling, noise, 20, 5, 1.3, rounds, 1e-5), rel=1e-12)
    assert acc.epsilon(0) == 0 and acc.epsilon(3, noise_multiplier=0.0) == math.inf
    if noise == "central":  # sampling 5 of 20 amplifies: less than every client every round
        assert acc.epsilon(7) < privacy.Accounting(1.3, 20, 5, 1e-5, sampling,
                                                   "local").epsilon(7)


@pytest.mark.parametrize("target", [1.0, 4.0, 16.0])
def test_target_epsilon_gives_a_multiplier_within_tolerance(target):
    acc = privacy.Accounting(0.0, 10, 3, 1e-5, "fixed", "central")
    sigma = privacy.calibrate(acc, 20, target)
    eps = acc.epsilon(20, noise_multiplier=sigma)
    assert eps <= target * (1 + 1e-6) and eps == pytest.approx(target, rel=1e-3)
    assert acc.epsilon(20, noise_multiplier=sigma * 0.99) > target  # the smallest such sigma


@pytest.fixture
def private_run(jsonl_data, tmp_path):
    cfg = load_config(BASE, tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "method.name": "fedkseed", "method.k": 16, "federation.rounds": 3,
        "privacy.enabled": True, "privacy.target_epsilon": 8.0, "privacy.clip_norm": 5.0,
        "eval.generate": False, "output.save_model": False}))
    return run(cfg, tmp_path / "run", progress=False), tmp_path / "run"


def test_a_private_run_logs_epsilon_every_round_and_in_the_summary(private_run):
    rows, run_dir = private_run
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    sigma = summary["noise_multiplier"]
    assert summary["target_epsilon"] == 8.0 and sigma > 0
    assert summary["clients"] == 4 and summary["clients_per_round"] == 2
    for r in rows[1:]:
        assert r["epsilon"] == pytest.approx(
            _library_epsilon("fixed", "central", 4, 2, sigma, r["round"], 1e-5), rel=1e-12)
    assert rows[-1]["epsilon"] == pytest.approx(8.0, rel=1e-3) == summary["epsilon"]
    assert "epsilon" in summary_table(rows).splitlines()[0]
    report = subprocess.run(_cli("report", str(run_dir)), capture_output=True, text=True,
                            check=True, timeout=120).stdout
    assert "epsilon" in report.splitlines()[0] and '"noise_multiplier"' in report


# --- kill -9 and resume ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method, noise", [("fedkseed", "central"), ("fedavg", "local"),
                                           ("ferret", "central")])
def test_a_private_run_killed_mid_round_resumes_to_the_same_model(method, noise, jsonl_data,
                                                                  tmp_path):
    """The noise is drawn from (run seed, round) or the client's round seed, not from a
    generator's running state, so the resumed run draws what the uninterrupted one did."""
    extra = ({"method.k": 16} if method == "fedkseed" else
             {"method.mode": "reference", "method.pool_size": 8} if method == "ferret" else {})
    overrides = tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "federation.rounds": 3, "train.local_steps": 3, "eval.generate": False,
        "method.name": method, "privacy.enabled": True, "privacy.noise_multiplier": 0.3,
        "privacy.clip_norm": 0.5, "privacy.noise": noise, **extra})
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    run(load_config(BASE, overrides), ref_dir, progress=False)

    proc = subprocess.Popen(_cli("run", str(BASE), *overrides, "--out", str(killed_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + 300
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("round 2/3  client"):
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert any(line.startswith("privacy: ") for line in seen), "".join(seen)
    rows = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]

    resumed = subprocess.run(_cli("run", "--resume", str(killed_dir), "--quiet"),
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr
    ref_rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert _stable(got_rows) == _stable(ref_rows)
    assert all(r["epsilon"] > 0 for r in got_rows[1:])
    a, b = load_file(ref_dir / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the noise is really there: without it the model differs
    quiet_dir = tmp_path / "quiet"
    run(load_config(BASE, [*overrides, "privacy.noise_multiplier=0.0"]), quiet_dir,
        progress=False)
    c = load_file(quiet_dir / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
