"""Ferret: block projection and reconstruction against dense matrices, unbiasedness with a
variance-derived tolerance, the truncated-normal sampler's distribution, allocation, bases that
are bit-identical across processes, server and clients bit-identical over rounds, and malformed
uploads rejected without touching the server."""

from __future__ import annotations

import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtune import randomness, wire
from fedtune.methods import projection
from fedtune.methods.base import FitContext, Upload, trainable_state
from fedtune.methods.ferret import (
    METHOD,
    Config,
    Layout,
    PaperMode,
    ReferenceMode,
    encode_upload_body,
    parse_download,
)
from fedtune.methods.registry import get_method
from fedtune.tasks import ClientData

# --- kernels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["truncnormal", "gaussian", "rademacher"])
def test_projection_and_reconstruction_match_dense_matrices(dist):
    d, n, seed = 50, 6, 1234
    parts = [torch.randn(20), torch.randn(30)]  # a block of two tensors
    delta = torch.cat(parts)
    v = projection.dense_bases(seed, n, d, dist)
    assert v.shape == (n, d)
    streams = [(seed, k) for k in range(n)]
    dots = projection.project(parts, streams, dist, d)
    np.testing.assert_allclose(dots, (v.double() @ delta.double()).numpy(), rtol=1e-5,
                               atol=1e-6)
    coefs = [0.5, -1.0, 0.0, 2.0, 0.25, 0.0]
    ws = [torch.zeros(20), torch.zeros(30)]
    projection.apply_(ws, [(seed, k, c) for k, c in enumerate(coefs)], dist, d)
    dense = torch.tensor(coefs).double() @ v.double()
    np.testing.assert_allclose(torch.cat(ws).numpy(), dense.numpy(), rtol=1e-5, atol=1e-6)
    # one tensor holding the whole block gets exactly the same bits as the two parts
    whole = torch.zeros(d)
    projection.apply_([whole], [(seed, k, c) for k, c in enumerate(coefs)], dist, d)
    assert torch.equal(whole, torch.cat(ws))
    if dist == "truncnormal":
        assert v.abs().max() <= 1 / math.sqrt(d) * (1 + 1e-6)
    if dist == "rademacher":
        assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert projection.basis_norm(seed, d, dist) == pytest.approx(float(v[0].double().norm()),
                                                                 rel=1e-12)


def test_reconstruction_into_bfloat16_rounds_once():
    d = 300
    v = projection.dense_bases(8, 2, d, "truncnormal")
    w = torch.randn(d).to(torch.bfloat16)
    want = (w.float() + (np.float32(0.7) * v[0] + np.float32(-0.2) * v[1])).to(torch.bfloat16)
    projection.apply_([w], [(8, 0, 0.7), (8, 1, -0.2)], "truncnormal", d)
    assert torch.equal(w.view(torch.int16), want.view(torch.int16))


def _fourth_moment(dist: str, d: int) -> float:
    if dist == "gaussian":
        return 3.0
    if dist == "rademacher":
        return 1.0
    a = 1 / math.sqrt(d)  # E[x^4] of N(0,1) truncated to [-a, a], by Simpson's rule
    xs = np.linspace(-a, a, 20001)
    w = np.exp(-xs**2 / 2)
    h = xs[1] - xs[0]
    simpson = lambda f: h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return simpson(w * xs**4) / simpson(w)


@pytest.mark.parametrize("dist", ["truncnormal", "rademacher"])
def test_reconstruction_is_unbiased(dist):
    """Mean over many seeds of sum_k gamma_k v_k with gamma_k = <v_k, Delta> / (rho K) is Delta,
    within 4.5 standard errors per coordinate, the standard error computed from the exact
    variance Var_j = (E[v^4]/rho^2 - 1) Delta_j^2 / K + sum_{i != j} Delta_i^2 / K."""
    d, k, trials = 24, 3, 6000
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=g, dtype=torch.float64)
    rho = projection.entry_variance(dist, d)
    total = torch.zeros(d, dtype=torch.float64)
    for t in range(trials):
        v = projection.dense_bases(1000 + t, k, d, dist).double()
        gamma = v @ delta / (rho * k)
        total += gamma @ v
    mean = total / trials
    m4 = _fourth_moment(dist, d)
    sq = delta**2
    var = ((m4 / rho**2 - 1) * sq + (sq.sum() - sq)) / k
    z = (mean - delta) / (var / trials).sqrt()
    assert z.abs().max() < 4.5, z
    # and the estimate is not trivially exact: its spread matches the predicted variance
    assert 0.5 < float(((mean - delta) ** 2 / (var / trials)).mean()) < 2.0


@pytest.mark.parametrize("a", [1 / math.sqrt(50), 0.5, 1.0])
def test_truncated_normal_sampler_distribution_and_variance(a):
    """truncnormal directions: in [-a, a] (to float32 rounding), the exact variance, and the
    CDF of N(0, 1) truncated to [-a, a] (Kolmogorov-Smirnov distance below the 0.1% critical
    value)."""
    n = 200_000
    x = randomness.fill_(torch.empty(n), 7, "truncnormal", a).double()
    assert x.abs().max() <= a * (1 + 1e-6)
    rho = randomness.truncnormal_variance(a)
    m4 = float((x**4).mean())
    se = math.sqrt((m4 - rho**2) / n)
    assert abs(float((x**2).mean()) - rho) < 4 * se
    s = np.sort(x.numpy())
    phi = lambda t: 0.5 * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))
    cdf = (phi(s) - phi(-a)) / (phi(a) - phi(-a))
    ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
    assert ks < 1.95 / math.sqrt(n)


def test_truncnormal_variance_matches_series_and_numeric_integral():
    for a in (1e-4, 5e-3, 0.05, 1.0):
        xs = np.linspace(-a, a, 20001)
        w = np.exp(-xs**2 / 2)
        numeric = np.trapezoid(w * xs**2, xs) / np.trapezoid(w, xs)
        assert randomness.truncnormal_variance(a) == pytest.approx(numeric, rel=1e-6)


def test_allocation_sums_to_k_with_a_minimum_and_follows_the_norms():
    norms = [10.0, 0.0, 1.0, 5.0, float("nan"), 4.0]
    counts = projection.allocate(norms, 40)
    assert sum(counts) == 40 and min(counts) >= 2
    assert counts[1] == counts[4] == 2
    # the blocks above the minimum share the rest (40 - 2*2 - ...) in proportion to the norm
    assert counts[0] > counts[3] > counts[2]
    assert counts[0] / counts[3] == pytest.approx(2.0, abs=0.3)
    assert projection.allocate([1.0] * 4, 10) in ([3, 3, 2, 2],)
    assert sum(projection.allocate([0.0] * 5, 17)) == 17
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 30))
        k = int(rng.integers(2 * n, 10 * n + 5))
        c = projection.allocate(list(rng.exponential(size=n) ** 3), k)
        assert sum(c) == k and min(c) >= 2
    with pytest.raises(ValueError, match="k >= 8"):
        projection.allocate([1.0] * 4, 7)


def test_greedy_grouping_follows_the_reference_rule():
    # median 100 -> target 90: big tensors alone, runs of small ones together
    sizes = [300, 10, 10, 100, 5, 20, 500, 200, 400]
    assert projection.block_groups(sizes) == [[0], [1, 2], [3], [4, 5], [6], [7], [8]]
    assert projection.block_groups(sizes, "tensor") == [[i] for i in range(9)]


_CHILD = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from fedtune.methods import projection
h = hashlib.sha256()
for dist in ("truncnormal", "gaussian", "rademacher"):
    h.update(projection.dense_bases(99, 3, 70_000, dist).numpy().tobytes())
    acc = torch.zeros(70_000)
    projection.apply_([acc], [(99, 0, 0.3), (99, 1, -1.5), (99, 2, 2.0)], dist, 70_000)
    h.update(acc.numpy().tobytes())
h.update(repr(projection.basis_norm(99, 70_000, "truncnormal")).encode())
print(h.hexdigest())
"""


def test_bases_and_reconstruction_are_bit_identical_across_processes_and_threads():
    outs = {subprocess.run([sys.executable, "-c", _CHILD, str(t)], capture_output=True,
                           text=True, check=True).stdout.strip() for t in (1, 2)}
    assert len(outs) == 1 and len(next(iter(outs))) == 64


# --- the method on a tiny model -------------------------------------------------------------------


class _Task:
    """Next-token loss on fixed token sequences (enough to give real gradients)."""

    def collate(self, examples):
        return torch.tensor([e["ids"] for e in examples])

    def loss(self, model, batch):
        return model(input_ids=batch, labels=batch).loss


class _Train:
    optimizer = "sgd"
    lr = 0.5
    momentum = 0.0
    weight_decay = 0.0
    local_steps = 2
    batch_size = 2
    grad_accum = 1
    max_grad_norm = 0.0


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=64)
    return LlamaForCausalLM(conf).eval()


def _data(cid):
    g = torch.Generator().manual_seed(cid)
    return ClientData([{"ids": torch.randint(0, 128, (12,), generator=g).tolist()}
                       for _ in range(6)])


def _ctx(r, cid):
    return FitContext(round=r, client_id=cid, seed=randomness.derive_seed(0, r, cid),
                      train=_Train(), task=_Task())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(cfg, rounds=2, clients=(0, 1)):
    model = _tiny()
    w0 = trainable_state(model)
    server = METHOD.make_server(cfg, w0, 0, "examples")
    client = METHOD.make_client(cfg, model, 0)
    last: dict[int, int] = {}
    for r in range(rounds):
        ups = []
        for cid in clients:
            down = server.download(r, last.get(cid))
            client.sync(down)
            before = _params(model)
            payload = client.fit(down, _data(cid), _ctx(r, cid))  # its sync has nothing to do
            # the shared model is back at the global weights after fit
            after = _params(model)
            assert all(torch.equal(before[n], after[n]) for n in before)
            ups.append(Upload(cid, 3 + cid, payload))
            last[cid] = r
        server.aggregate(r, ups)
    client.sync(server.download(rounds, last[clients[0]]))
    return model, server, client, w0


@pytest.mark.parametrize("opts", [{}, {"mode": "reference", "server_momentum": 0.5,
                                       "pool_size": 16, "clip_norm": 0.05},
                                  {"distribution": "rademacher", "wire_dtype": "float16"}])
def test_server_and_clients_stay_bit_identical(opts):
    cfg = Config(k=64, **opts)
    model, server, client, w0 = _run(cfg)
    assert client.round == server.round == 2
    changed = 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), server.weights[n]), n
        changed += int(not torch.equal(p.detach(), w0[n]))
    assert changed == len(w0)
    # a fresh client (initial weights, since=None) replays every round to the same bits
    fresh = _tiny()
    c2 = METHOD.make_client(cfg, fresh, 0)
    c2.sync(server.download(2, None))
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach(), server.weights[n]), n
    # a server restored from its state serves the same bytes and holds the same weights
    restored = METHOD.make_server(cfg, w0, 0, "examples")
    restored.load_state_dict(server.state_dict())
    assert restored.download(2, None) == server.download(2, None)
    assert all(torch.equal(restored.weights[n], t) for n, t in server.weights.items())
    # a client further along skips what it has; one that is behind the download is refused
    client.sync(server.download(2, 0))
    with pytest.raises(wire.MessageError, match="since=0"):
        METHOD.make_client(cfg, _tiny(), 0).sync(server.download(2, 1))


def _one_round_error(cfg: Config) -> tuple[float, float]:
    """One round, one client: ``(observed, predicted)`` squared error of the server's update
    against the true Delta, the prediction ``sum_l (d_l + 1) / K_l ||Delta_l||^2`` (Gaussian
    bases) taken from the counts the client chose."""
    from fedtune.methods.ferret import decode_upload_body
    from fedtune.methods.training import local_train

    ref = _tiny()
    w0 = trainable_state(ref)
    local_train(ref, _data(0), _ctx(0, 0))  # the true local model, same batches as below
    true = {n: w0[n] - p.detach() for n, p in ref.named_parameters()}
    model = _tiny()
    client = METHOD.make_client(cfg, model, 0)
    server = METHOD.make_server(cfg, w0, 0, "equal")
    up = client.fit(server.download(0, None), _data(0), _ctx(0, 0))
    server.aggregate(0, [Upload(0, 1, up)])
    counts = decode_upload_body(cfg, client.layout, up[wire.HEADER_SIZE:]).counts
    names = client.layout.names
    predicted = observed = 0.0
    for block, group in enumerate(client.layout.groups):
        sq = sum(float(true[names[i]].double().norm() ** 2) for i in group)
        predicted += (client.layout.sizes[block] + 1) / counts[block] * sq
        observed += sum(float((w0[names[i]] - server.weights[names[i]]
                               - true[names[i]]).double().norm() ** 2) for i in group)
    return observed, predicted


def test_one_round_error_matches_the_predicted_variance():
    """Gaussian bases: the observed error is within a factor 2 of the prediction at two values
    of K (and so shrinks as K grows)."""
    d = sum(p.numel() for p in _tiny().parameters())
    (small_obs, small_pred), (big_obs, big_pred) = (
        _one_round_error(Config(k=k, distribution="gaussian")) for k in (64, d // 4))
    assert 0.5 < small_obs / small_pred < 2 and 0.5 < big_obs / big_pred < 2
    assert big_obs < small_obs / 10


def test_upload_bytes_are_four_per_coordinate_plus_a_small_header():
    for dtype, per in (("float32", 4), ("float16", 2)):
        cfg = Config(k=48, wire_dtype=dtype)
        model = _tiny()
        client = METHOD.make_client(cfg, model, 0)
        server = METHOD.make_server(cfg, trainable_state(model), 0, "examples")
        up = client.fit(server.download(0, None), _data(0), _ctx(0, 0))
        nblocks = len(client.layout)
        assert len(up) == wire.HEADER_SIZE + 18 + nblocks + per * 48
        server.aggregate(0, [Upload(0, 1, up)])
        down = server.download(1, None)
        # u32 count + (round, length) + record head (u8, f64, u16) + (f64, u32) + body
        assert len(down) == wire.HEADER_SIZE + 4 + 8 + 11 + 12 + len(up) - wire.HEADER_SIZE
        target, records = parse_download(down)
        assert target == 1 and [r for r, _ in records] == [0]


def _upload_for(cfg):
    model = _tiny()
    client = METHOD.make_client(cfg, model, 0)
    server = METHOD.make_server(cfg, trainable_state(model), 0, "examples")
    return server, client, client.fit(server.download(0, None), _data(0), _ctx(0, 0))


def _retag(payload, body):
    return wire.frame(5, wire.UP, 0, body)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: _retag(p, p[wire.HEADER_SIZE:-4]), "coordinates, its layout says"),
    (lambda p: _retag(p, p[wire.HEADER_SIZE:] + b"\0\0\0\0"), "coordinates, its layout says"),
    (lambda p: _retag(p, p[wire.HEADER_SIZE:-4] + np.float32(np.nan).tobytes()), "NaN"),
    (lambda p: p[:wire.HEADER_SIZE + 12] + b"\1\2\3\4" + p[wire.HEADER_SIZE + 16:],
     "unknown block layout"),
    (lambda p: p[:wire.HEADER_SIZE] + b"\1" + p[wire.HEADER_SIZE + 1:], "mode"),
    (lambda p: p[:-1], "header says"),
])
def test_malformed_uploads_are_rejected_and_leave_the_server_untouched(mutate, message):
    cfg = Config(k=48)
    server, _, good = _upload_for(cfg)
    before = {k: (v if not isinstance(v, dict) else {n: t.clone() for n, t in v.items()})
              for k, v in server.state_dict().items()}
    with pytest.raises(wire.MessageError, match=message) as err:
        server.aggregate(0, [Upload(0, 1, good), Upload(7, 1, mutate(good))])
    assert "client 7" in str(err.value)
    after = server.state_dict()
    assert after["round"] == before["round"] == 0 and after["log"] == before["log"] == []
    for n, t in before["weights"].items():
        assert torch.equal(after["weights"][n], t)
    server.aggregate(0, [Upload(0, 1, good)])  # the good upload alone still works
    assert server.round == 1


def _paper_record(eta=1.0, weight=None, last=None):
    """Round 1 of a two-round run, rebuilt with a chosen server step, first client weight or
    last coordinate of the first client."""
    cfg = Config(k=64)
    _, server, _, _ = _run(cfg)
    rec = bytearray(server.log[1])
    struct.pack_into("<d", rec, 1, eta)
    if weight is not None:
        struct.pack_into("<d", rec, 11, weight)
    if last is not None:  # the first client's last float32 coordinate
        (length,) = struct.unpack_from("<I", rec, 19)
        struct.pack_into("<f", rec, 23 + length - 4, last)
    server.log[1] = bytes(rec)
    return cfg, server


@pytest.mark.parametrize("case, message", [
    ({"weight": 2.0, "last": 3.4e38}, "weight"),
    ({"last": 3.4e38, "eta": 10.0}, "overflows float32"),
    ({"eta": float("nan")}, "server step"),
    ({"eta": float("inf")}, "server step"),
    ({"eta": 1e300}, "server step"),
    ({"eta": -1.0}, "server step"),
    ({"weight": float("nan")}, "weight"),
])
def test_a_bad_record_anywhere_in_a_download_changes_nothing(case, message):
    """A fresh client syncing from w0 gets two records, the second bad: it raises
    MessageError and its weights are still w0, bit for bit (record 0 was not applied)."""
    cfg, server = _paper_record(**case)
    model = _tiny()
    w0 = _params(model)
    client = METHOD.make_client(cfg, model, 0)
    with pytest.raises(wire.MessageError, match=message):
        client.sync(server.download(2, None))
    assert client.round == 0
    assert all(torch.equal(p, w0[n]) for n, p in _params(model).items())


def test_reference_records_with_a_bad_clip_are_refused():
    cfg = Config(k=64, mode="reference", pool_size=8)
    _, server, _, _ = _run(cfg, rounds=1)
    for clip in (float("nan"), -1.0):
        rec = bytearray(server.log[0])
        struct.pack_into("<d", rec, 9, clip)
        server.log[0] = bytes(rec)
        with pytest.raises(wire.MessageError, match="clip norm"):
            METHOD.make_client(cfg, _tiny(), 0).sync(server.download(1, None))


def test_uploads_are_bounded_by_k():
    cfg = Config(k=48)
    server, client, _ = _upload_for(cfg)
    layout = client.layout
    big = Config(k=480)
    counts = [10] * len(layout)
    body = encode_upload_body(big, Layout(big, list(zip(layout.names, layout.shapes))), 1,
                              counts, [0.1] * sum(counts))
    with pytest.raises(wire.MessageError, match="more than method.k = 48"):
        server.aggregate(0, [Upload(3, 1, wire.frame(5, wire.UP, 0, body))])


def test_layout_of_the_wrong_model_is_rejected():
    cfg = Config(k=64)
    _, _, up = _upload_for(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64))
    server = METHOD.make_server(cfg, trainable_state(other), 0, "examples")
    with pytest.raises(wire.MessageError, match="unknown block layout"):
        server.aggregate(0, [Upload(0, 1, up)])
    assert server.round == 0 and server.log == []


def test_config_and_registry():
    assert get_method("ferret").method_id == 5
    with pytest.raises(ValueError, match="reference-mode"):
        Config(server_momentum=0.9)
    # the default bases follow the mode; the authors' d_l/K_l scale takes only theirs
    assert Config().distribution == "rademacher"
    assert Config(mode="reference").distribution == "truncnormal"
    with pytest.raises(ValueError, match="multiply the update by d_l"):
        Config(mode="reference", distribution="rademacher")
    with pytest.raises(ValueError, match="method.k >= "):
        PaperMode(Config(k=4), Layout(Config(k=4), [(f"t{i}", torch.Size([10]))
                                                    for i in range(5)]), 0)


def test_in_process_engine_runs_ferret_and_the_final_model_is_the_servers(jsonl_data, tmp_path):
    from safetensors.torch import load_file

    from fedtune.config import load_config
    from fedtune.engines.inprocess import run

    from .conftest import BASE, tiny_overrides

    over = tiny_overrides(jsonl_data, tmp_path / "runs", **{"method.name": "ferret",
                                                             "method.k": 64})
    cfg = load_config(BASE, over)
    rows = run(cfg, tmp_path / "ferret", progress=False)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 18 + 64 * 4 < r["bytes_up_per_client"] < 18 + 64 * 4 + 200
        assert r["time_project"] > 0 and r["method_coordinates"] == 64
    from fedtune.runlog import RunLog

    ckpt = RunLog(tmp_path / "ferret").load_checkpoint()
    final = load_file(str(tmp_path / "ferret" / "model.safetensors"))
    assert ckpt["server"]["weights"].keys() == final.keys()
    for n, t in ckpt["server"]["weights"].items():
        assert torch.equal(final[n], t), n


def test_reference_allocation_is_the_authors_rule():
    """max(int(K norm_l / max norm), 2) with K the pool: the largest block uses the whole pool,
    the others in proportion (truncated), none fewer than 2; a NaN norm gets 2."""
    layout = Layout(Config(mode="reference"), [(f"t{i}", torch.Size([10])) for i in range(5)])
    mode = ReferenceMode(Config(mode="reference"), layout, 0)
    assert mode.allocate([1.0, 0.5, 0.2049, 0.004, float("nan")]) == [200, 100, 40, 2, 2]
    assert mode.allocate([0.0] * 3) == [2, 2, 2]
    # the bound is the pool per block, not method.k: 200 x 5 coordinates are accepted
    cfg = Config(k=8, mode="reference")
    server = METHOD.make_server(cfg, {f"t{i}": torch.zeros(10) for i in range(5)}, 0, "equal")
    for counts, ok in (([200] * 5, True), ([201] + [2] * 4, False)):
        body = wire.frame(5, wire.UP, 0, encode_upload_body(cfg, layout, 3, counts,
                                                            [1e-3] * sum(counts)))
        if ok:
            server.decode(body, 0)
        else:
            with pytest.raises(wire.MessageError, match="201 bases in a block, more than 200"):
                server.decode(body, 0)


def test_reference_mode_uses_the_shared_pool_the_d_over_k_scale_and_the_clip():
    cfg = Config(k=64, mode="reference", pool_size=8, clip_norm=1e-3)
    model = _tiny()
    w0 = trainable_state(model)
    client = METHOD.make_client(cfg, model, 0)
    snapshot = [t.clone() for t in w0.values()]
    with torch.no_grad():
        for p in client.params.values():
            p.add_(0.01 * torch.randn_like(p))
    counts, coords = client.project(snapshot, seed=77)
    mode, layout, params = client.mode, client.layout, list(client.params.values())
    norms = [float(torch.cat(client.block_delta(snapshot, params, b)).norm())
             for b in range(len(layout))]
    assert counts == mode.allocate(norms) and max(counts) == 8 and sum(counts) == len(coords)
    pos = 0
    for block, n in enumerate(counts):
        delta = torch.cat(client.block_delta(snapshot, params, block)).double()
        d = layout.sizes[block]
        for j, k in enumerate(mode.indices(77, block, n)):
            v = projection.dense_bases(mode.stream(k, block), 1, d, "truncnormal")[0]
            assert coords[pos + j] == pytest.approx(float(v.double() @ delta) * d / n,
                                                    rel=1e-5, abs=1e-9)
        pos += n
    # every (seed, block) term the server applies is clipped to clip_norm
    server = METHOD.make_server(cfg, w0, 0, "equal")
    body = wire.frame(5, wire.UP, 0, encode_upload_body(cfg, layout, 77, counts, coords))
    server.aggregate(0, [Upload(0, 1, body)])
    terms = int((server.mode.table != 0).sum())
    moved = 0.0  # sum over blocks of the block's change: at most (terms in it) x clip_norm
    for group in layout.groups:
        names = [layout.names[i] for i in group]
        moved += float(torch.cat([(w0[n] - server.weights[n]).view(-1) for n in names]).norm())
    assert 0 < moved <= terms * 1e-3 * (1 + 1e-4)
