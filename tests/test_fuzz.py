"""Seeded random mutations of valid messages of every method: a receiver raises MessageError
and nothing else, and a rejected message leaves it exactly as it was (bit for bit)."""

from __future__ import annotations

import copy
import random
import struct
import zlib

import pytest
import torch

from fedtune import wire
from fedtune.methods.base import Upload, trainable_parameters, trainable_state
from fedtune.methods.registry import get_method
from tests.test_ferret import _ctx, _data, _tiny

TRIES = 1000
METHODS = [("fedavg", {}), ("fedzo", {}), ("fedkseed", {"k": 16}),
           ("fedkseed_pro", {"k": 16}), ("ferret", {"k": 64}),
           ("ferret", {"k": 64, "mode": "reference", "pool_size": 8}),
           ("fedit", {"rank": 2}), ("federa", {"rank": 2})]
SPECIAL = [b"\0\0\0\0", b"\xff\xff\xff\xff", struct.pack("<f", float("nan")),
           struct.pack("<f", float("inf")), struct.pack("<f", 3.4e38), struct.pack("<I", 1 << 31)]


def mutate(msg: bytes, rng: random.Random) -> bytes:
    b = bytearray(msg)
    kind = rng.randrange(6)
    i = rng.randrange(len(b))
    if kind == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b[i] = rng.randrange(256)
    elif kind == 2:
        return bytes(b[:i])
    elif kind == 3:
        return bytes(b[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9))) + b[i:])
    elif kind == 4:
        v = rng.choice(SPECIAL) + (b"\0\0\0\0" if rng.random() < 0.3 else b"")
        b[i: i + len(v)] = v
    else:  # the header's fields, where most checks live
        j = rng.randrange(min(len(b), wire.HEADER_SIZE + 24))
        b[j] = rng.randrange(256)
    return bytes(b)


def _state(obj) -> list:
    """Everything a server or client half holds, as comparable leaves (tensors by bits)."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.detach().cpu().contiguous().view(torch.uint8).clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                out.append(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "__array__"):
            out.append(bytes(memoryview(x.copy(order="C")).cast("B")))
        else:
            out.append(x)

    walk(obj)
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _client_state(client) -> list:
    keep = {k: v for k, v in vars(client).items()
            if k not in ("model", "params", "stepper", "cfg", "mode", "layout")}
    return _state(keep) + _state(dict(trainable_parameters(client.model)))


def _setup(name, opts):
    spec = get_method(name)
    cfg = spec.config_cls(**opts)
    model = _tiny()
    if spec.prepare_model is not None:
        model = spec.prepare_model(model, cfg, 0)
    server = spec.make_server(cfg, trainable_state(model), 0, "examples")
    pristine = copy.deepcopy(model)
    client = spec.make_client(cfg, model, 0)
    for r in range(2):
        down = server.download(r, None if r == 0 else r - 1)
        up = client.fit(down, _data(0), _ctx(r, 0))
        server.aggregate(r, [Upload(0, 6, up)])
    up = client.fit(server.download(2, 1), _data(0), _ctx(2, 0))
    return spec, cfg, server, up, pristine


@pytest.mark.parametrize("name,opts", METHODS,
                         ids=[f"{n}-{o.get('mode', '')}" for n, o in METHODS])
def test_mutated_messages_raise_message_error_and_change_nothing(name, opts):
    spec, cfg, server, up, pristine = _setup(name, opts)
    rng = random.Random(zlib.crc32(f"{name}{sorted(opts.items())}".encode()))
    saved = copy.deepcopy(server.state_dict())
    before = _state(server.state_dict())
    for _ in range(TRIES):  # uploads to the server at round 2
        bad = mutate(up, rng)
        try:
            server.aggregate(2, [Upload(0, 6, bad)])
        except wire.MessageError:
            assert _same(_state(server.state_dict()), before)
            continue
        server.load_state_dict(copy.deepcopy(saved))  # a mutation that is still valid
    down = server.download(2, None)
    fresh = spec.make_client(cfg, copy.deepcopy(pristine), 0)
    clean = _client_state(fresh)
    for _ in range(TRIES):  # the full download to a fresh client
        bad = mutate(down, rng)
        try:
            fresh.sync(bad)
        except wire.MessageError:
            assert _same(_client_state(fresh), clean)
            continue
        fresh = spec.make_client(cfg, copy.deepcopy(pristine), 0)


@pytest.mark.parametrize("name,opts", METHODS,
                         ids=[f"{n}-{o.get('mode', '')}" for n, o in METHODS])
def test_a_server_refuses_to_describe_a_round_it_has_not_reached(name, opts):
    """A download header tagged with a round ahead of the server's would tell a client it holds
    a model nobody has: every server refuses (at round 2 here)."""
    _, _, server, _, _ = _setup(name, opts)
    assert server.round == 2
    with pytest.raises(ValueError, match="server is at round 2"):
        server.download(3, None)
    assert wire.unframe(server.download(2, None), method_id=server.method_id,
                        kind=wire.DOWN)[0].round == 2
