"""FedAvg and the wire format: exact weighted averages, round trips, and malformed uploads
rejected without touching the server."""

from __future__ import annotations

import pytest
import torch

from fedtune import wire
from fedtune.methods.base import Upload
from fedtune.methods.fedavg import METHOD, Config


def _server(weighting="examples", wire_dtype="float32"):
    initial = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    return METHOD.make_server(Config(wire_dtype=wire_dtype), initial, 0, weighting)


def _upload(server, cid, n, a, b, round_=0):
    body = wire.pack_tensors({"a": torch.full((2, 3), a), "b": torch.full((4,), b)})
    return Upload(cid, n, wire.frame(server.method_id, wire.UP, round_, body))


def test_weighted_average_by_examples_and_equal():
    s = _server()
    s.aggregate(0, [_upload(s, 0, 1, 1.0, 10.0), _upload(s, 1, 3, 5.0, 2.0)])
    # (1 * 1 + 3 * 5) / 4 = 4 ; (1 * 10 + 3 * 2) / 4 = 4
    assert torch.allclose(s.weights["a"], torch.full((2, 3), 4.0))
    assert torch.allclose(s.weights["b"], torch.full((4,), 4.0))
    e = _server("equal")
    e.aggregate(0, [_upload(e, 0, 1, 1.0, 10.0), _upload(e, 1, 3, 5.0, 2.0)])
    assert torch.allclose(e.weights["a"], torch.full((2, 3), 3.0))
    assert torch.allclose(e.weights["b"], torch.full((4,), 6.0))


def test_download_round_trip_into_a_client_model():
    model = torch.nn.Linear(3, 2)
    client = METHOD.make_client(Config(), model, 0)
    initial = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    server = METHOD.make_server(Config(), initial, 0, "examples")
    down = server.download(0, since=None)
    client.sync(down)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), initial[n])
    # header + u32 count + per tensor (name, dtype, ndim, dims) + 4 bytes per value
    names = sum(2 + len(n) + 2 + 4 * t.dim() for n, t in initial.items())
    assert len(down) == wire.HEADER_SIZE + 4 + names + 4 * (6 + 2)


def test_half_precision_wire_halves_the_bytes():
    full = len(_server().download(0, None))
    half = len(_server(wire_dtype="bfloat16").download(0, None))
    overhead = wire.HEADER_SIZE + 4 + (2 + 1 + 2 + 8) + (2 + 1 + 2 + 4)
    assert full - overhead == 2 * (half - overhead)


@pytest.mark.parametrize("mutate, message", [
    (lambda s, u: Upload(u.client_id, u.num_examples, u.payload[:-1]), "header says"),
    (lambda s, u: Upload(u.client_id, u.num_examples, b"xx" + u.payload[2:]), "bad magic"),
    (lambda s, u: _upload(s, 1, 3, float("nan"), 1.0), "NaN"),
    (lambda s, u: _upload(s, 1, 3, 1.0, 1.0, round_=5), "for round 5"),
    (lambda s, u: Upload(1, 3, wire.frame(s.method_id, wire.UP, 0, wire.pack_tensors(
        {"a": torch.zeros(3, 2), "b": torch.zeros(4)}))), r"has shape \(3, 2\)"),
    (lambda s, u: Upload(1, 3, wire.frame(s.method_id, wire.UP, 0, wire.pack_tensors(
        {"a": torch.zeros(2, 3)}))), "missing 1 tensors"),
    (lambda s, u: Upload(1, 3, wire.frame(s.method_id + 1, wire.UP, 0, b"")), "method id"),
])
def test_malformed_upload_is_rejected_and_state_untouched(mutate, message):
    s = _server()
    before = {n: t.clone() for n, t in s.weights.items()}
    good = _upload(s, 0, 1, 1.0, 1.0)
    bad = mutate(s, _upload(s, 1, 3, 2.0, 2.0))
    with pytest.raises(wire.MessageError, match=message) as e:
        s.aggregate(0, [good, bad])
    assert str(e.value).startswith("client 1: ") and e.value.client_id == 1  # the bad one named
    assert s.round == 0
    for n, t in s.weights.items():
        assert torch.equal(t, before[n])


def test_server_keeps_float32_on_the_cpu_and_averages_in_float32():
    """bfloat16 uploads (wire_dtype bfloat16) weighted 0.1 .. 0.4: the server's average is the
    exact one to float32 precision and the download rounds it to bfloat16 once; accumulating in
    bfloat16 instead would round 18 of these 64 values differently."""
    g = torch.Generator().manual_seed(0)
    x = (1 + torch.rand(4, 64, generator=g)).bfloat16()
    server = METHOD.make_server(Config(wire_dtype="bfloat16"),
                                {"w": torch.zeros(64, dtype=torch.bfloat16)}, 0, "examples")
    assert server.weights["w"].dtype == torch.float32 and server.weights["w"].device.type == "cpu"
    uploads = [Upload(i, i + 1, wire.frame(server.method_id, wire.UP, 0,
                                           wire.pack_tensors({"w": x[i]}))) for i in range(4)]
    server.aggregate(0, uploads)
    exact = sum((i + 1) / 10 * x[i].double() for i in range(4))
    assert (server.weights["w"].double() - exact).abs().max() < 2e-7
    _, body = wire.unframe(server.download(1, None), method_id=server.method_id, kind=wire.DOWN)
    down = wire.unpack_tensors(wire.Reader(body))["w"]
    assert down.dtype == torch.bfloat16 and torch.equal(down, exact.bfloat16())
    naive = torch.zeros(64, dtype=torch.bfloat16)
    for i in range(4):
        naive.add_(x[i], alpha=(i + 1) / 10)
    assert int((naive != exact.bfloat16()).sum()) == 18


def test_bfloat16_client_rounds_the_download_once_and_uploads_exactly():
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    client = METHOD.make_client(Config(), model, 0)  # float32 wire
    initial = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
               for n, p in model.named_parameters()}
    server = METHOD.make_server(Config(), initial, 0, "examples")
    client.sync(server.download(0, None))
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), initial[n].bfloat16())
    parts = wire.tensor_parts({n: p.detach().to(device="cpu", dtype=torch.float32)
                               for n, p in model.named_parameters()})
    up = wire.unpack_tensors(wire.Reader(b"".join(parts)), server.expected())
    for n, p in model.named_parameters():  # widening bfloat16 to the float32 wire is exact
        assert torch.equal(up[n], p.detach().float())


def test_hostile_shapes_counts_and_overflows_are_refused_and_change_nothing():
    import struct

    # a shape whose product overflows 64 bits: refused by name before any data is read
    body = struct.pack("<IH", 1, 1) + b"w" + struct.pack("<BB", 0, 4) + struct.pack(
        "<4I", *[65536] * 4)
    with pytest.raises(wire.MessageError, match="has shape"):
        wire.unpack_tensors(wire.Reader(body), {"w": ((2, 2), torch.float32)})
    s = _server()
    before = {n: t.clone() for n, t in s.weights.items()}
    cases = {
        "uploaded twice": [_upload(s, 0, 1, 1.0, 1.0), _upload(s, 0, 1, 1.0, 1.0)],
        "example count": [_upload(s, 0, 1, 1.0, 1.0), _upload(s, 1, -1, 1.0, 1.0)],
        "whole number": [_upload(s, 0, 1, 1.0, 1.0),
                         Upload(1, 2.5, _upload(s, 1, 1, 1.0, 1.0).payload)],
    }
    for what, ups in cases.items():
        with pytest.raises(wire.MessageError, match=what) as err:
            s.aggregate(0, ups)
        assert err.value.client_id is not None, what
        assert s.round == 0 and all(torch.equal(s.weights[n], before[n]) for n in before)
    # FedZO adds the mean delta to the global weights: finite deltas can still overflow
    from fedtune.methods.fedzo import METHOD as FEDZO
    from fedtune.methods.fedzo import Config as ZOConfig

    z = FEDZO.make_server(ZOConfig(), {"a": torch.full((2, 3), 3e38), "b": torch.zeros(4)}, 0,
                          "equal")
    with pytest.raises(wire.MessageError, match="overflow") as err:
        z.aggregate(0, [_upload(z, 0, 1, 1.0, 1.0), _upload(z, 1, 1, 3e38, 1.0)])
    assert err.value.client_id == 1 and z.round == 0  # the upload that tipped the sum
    assert torch.equal(z.weights["a"], torch.full((2, 3), 3e38))
