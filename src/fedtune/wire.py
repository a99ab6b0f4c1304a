"""The binary encoding every message uses: a fixed header, then a method-defined body.

The byte counts fedtune reports are ``len()`` of what these functions produce, so nothing here may
be lazy about size: no pickle, no padding, no compression that a method did not choose.

Header (14 bytes, little-endian)::

    magic  b"FT"      2 bytes
    format version    u8      (WIRE_VERSION; bumped when any layout changes)
    method id         u8      (one per method, see ``methods.registry``)
    kind              u8      (0 = download to a client, 1 = upload to the server)
    randomness        u8      (RANDOMNESS_VERSION: the seed -> direction contract the sender
                               uses; 0 from releases before version 3)
    round             u32
    body length       u32     (checked: a truncated or padded message is rejected)

A malformed message raises :class:`MessageError` before any state is touched, and so does a
message from a peer with another randomness version: for a seed-based method it would rebuild
other directions and silently diverge, and for the others it means another fedtune release.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.randomness import RANDOMNESS_VERSION

WIRE_VERSION = 1
MAGIC = b"FT"
HEADER = struct.Struct("<2sBBBBII")
HEADER_SIZE = HEADER.size  # 14

DOWN = 0
UP = 1


class MessageError(ValueError):
    """A message that cannot be accepted: wrong format, wrong round, wrong shape, NaN, ...
    ``client_id`` names the client whose upload it was, when one is to blame (the round loop
    then drops that client and aggregates the others)."""

    def __init__(self, message: str, client_id: int | None = None):
        super().__init__(message)
        self.client_id = client_id


@dataclass(frozen=True)
class Header:
    method_id: int
    kind: int
    round: int


def frame(method_id: int, kind: int, round_: int, body: bytes | list) -> bytes:
    """Prefix ``body`` with the header. ``body`` may be a list of bytes-like parts (see
    :func:`tensor_parts`): they are joined once, straight into the message, so a model-sized
    message costs one copy of the model, not three."""
    parts = body if isinstance(body, list) else [body]
    length = sum(memoryview(p).nbytes for p in parts)
    header = HEADER.pack(MAGIC, WIRE_VERSION, method_id, kind, RANDOMNESS_VERSION, round_,
                         length)
    return b"".join([header, *parts])


def unframe(
    data: bytes, *, method_id: int, kind: int, round_: int | None = None
) -> tuple[Header, memoryview]:
    """Check the header against what the receiver expects and return (header, body)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"message must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_SIZE:
        raise MessageError(f"message of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, mid, knd, rv, rnd, length = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise MessageError("not a fedtune message (bad magic)")
    if version != WIRE_VERSION:
        raise MessageError(f"wire format version {version}, this fedtune speaks {WIRE_VERSION}")
    if rv != RANDOMNESS_VERSION:
        sender = f"v{rv}" if rv else "v2 or earlier"
        raise MessageError(
            f"message uses shared randomness {sender}, this fedtune uses v{RANDOMNESS_VERSION}: "
            "its seeds would rebuild other directions; run the same fedtune release everywhere")
    if mid != method_id:
        raise MessageError(f"message is for method id {mid}, expected {method_id}")
    if knd != kind:
        raise MessageError(f"message kind {knd}, expected {kind} ({'upload' if kind else 'download'})")
    if round_ is not None and rnd != round_:
        raise MessageError(f"message is for round {rnd}, expected round {round_}")
    if len(data) - HEADER_SIZE != length:
        raise MessageError(
            f"message body is {len(data) - HEADER_SIZE} bytes, header says {length}"
        )
    return Header(mid, knd, rnd), memoryview(data)[HEADER_SIZE:]


class Reader:
    """Sequential reader over a message body that raises MessageError on any overrun."""

    def __init__(self, body: memoryview | bytes):
        self.body = memoryview(body)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.body):
            raise MessageError(
                f"message truncated: wanted {n} bytes at offset {self.pos} of {len(self.body)}"
            )
        out = self.body[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        """``count`` items of numpy ``dtype`` (read-only view, no copy)."""
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(dt.itemsize * count), dtype=dt)

    def done(self) -> None:
        if self.pos != len(self.body):
            raise MessageError(f"{len(self.body) - self.pos} unexpected trailing bytes in message")


def check_finite(values: np.ndarray | torch.Tensor, what: str) -> None:
    arr = values if isinstance(values, np.ndarray) else values.detach().cpu().numpy()
    if arr.size and not np.isfinite(arr).all():
        raise MessageError(f"{what} contains NaN or infinite values")


# --- named tensors ----------------------------------------------------------------------------
# Used by every method that ships weights (FedAvg, FedZO, FedIT, FeDeRA): a table of names,
# dtypes and shapes, then the raw little-endian data.

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
_NP = {0: "<f4", 1: "<f2", 2: "<u2"}


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Encode named floating tensors: ``u32 count`` then per tensor a header and raw data."""
    return b"".join(tensor_parts(tensors))


def tensor_parts(tensors: Mapping[str, torch.Tensor]) -> list:
    """:func:`pack_tensors` as a list of parts whose data parts are views of the tensors (no
    copy); pass it to :func:`frame`. The tensors must not change until the message is built."""
    parts: list = [struct.pack("<I", len(tensors))]
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot encode {name} of dtype {t.dtype}")
        nb = name.encode()
        parts.append(struct.pack("<H", len(nb)) + nb)
        parts.append(struct.pack("<BB", _DTYPES[t.dtype], t.dim()))
        parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
        c = t.detach().contiguous().cpu()
        if c.dtype == torch.bfloat16:
            c = c.view(torch.int16)
        parts.append(memoryview(c.numpy()).cast("B"))
    return parts


def unpack_tensors(
    reader: Reader, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> dict[str, torch.Tensor]:
    """Decode what :func:`pack_tensors` wrote; with ``expected`` (name -> (shape, dtype)) check
    that exactly those tensors arrived, with those shapes, and that every value is finite."""
    (count,) = reader.unpack("I")
    out: dict[str, torch.Tensor] = {}
    for _ in range(count):
        (nlen,) = reader.unpack("H")
        name = bytes(reader.take(nlen)).decode("utf-8", errors="replace")
        code, ndim = reader.unpack("BB")
        if code not in _DTYPE_OF:
            raise MessageError(f"tensor {name}: unknown dtype code {code}")
        shape = reader.unpack(f"{ndim}I") if ndim else ()
        if expected is not None:  # name and shape checked before any data is read
            if name not in expected:
                raise MessageError(f"unexpected tensor {name!r} in message")
            if tuple(shape) != tuple(expected[name][0]):
                raise MessageError(f"tensor {name!r} has shape {tuple(shape)}, expected "
                                   f"{tuple(expected[name][0])}")
        numel = math.prod(shape)  # Python integers: no overflow for hostile shapes
        arr = reader.array(_NP[code], numel)
        t = torch.from_numpy(arr.copy())
        if code == 2:
            t = t.view(torch.bfloat16)
        try:
            t = t.reshape(shape)
        except RuntimeError as e:  # e.g. a zero-sized shape whose strides overflow
            raise MessageError(f"tensor {name!r}: impossible shape {tuple(shape)} ({e})") from None
        if name in out:
            raise MessageError(f"tensor {name} appears twice")
        if expected is not None and t.dtype != expected[name][1]:
            raise MessageError(f"tensor {name!r} has dtype {t.dtype}, expected "
                               f"{expected[name][1]}")
        check_finite(t.float(), f"tensor {name!r}")
        out[name] = t
    if expected is not None and len(out) != len(expected):
        missing = [n for n in expected if n not in out]
        raise MessageError(f"message is missing {len(missing)} tensors, first {missing[:3]}")
    return out
