"""The method interface: a server half and a client half that exchange only bytes.

::

    server.download(round, since)            -> bytes      (to a client)
    client.sync(download)                     brings the client's model to the global round
    client.fit(download, data, ctx)          -> bytes      (upload: the client's contribution)
    server.aggregate(round, [Upload, ...])    new global state (validates every upload first)

Engines (in-process, Flower) know nothing about any method: they deliver bytes and call these.
One client half lives per *process* and owns the process's single copy of the model; in the
in-process engine every simulated client shares it, on Flower each SuperNode has its own.

``since`` is the global round the receiving client's model is known to be at (``None``: a client
that has only the initial weights). Methods whose download is stateless (full weights) ignore it;
methods that ship updates (Ferret, FedKSeed) use it to send what that client is missing, and
their downloads are self-describing so a client whose model is further along than ``since`` skips
what it already has.

Every method module defines: a ``Config`` dataclass (each field documented), a ``Server`` and a
``Client`` class following the protocols below, and a ``METHOD`` :class:`MethodSpec` entry that
``methods.registry`` collects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedtune import wire


@dataclass(frozen=True)
class Upload:
    """One client's payload as the server receives it."""

    client_id: int
    num_examples: int
    payload: bytes


@dataclass
class FitContext:
    """What the engine tells a client half about the local work it is asked to do."""

    round: int
    client_id: int
    seed: int
    """Seed for everything random in this client's local work this round (batch order, ZO
    seeds): derived from (run seed, round, client id), so resuming and re-running agree."""
    train: Any
    """The ``TrainConfig`` (optimizer, lr, local steps, batch size, ...)."""
    task: Any
    """The task (``fedtune.tasks``): loss(model, batch) and collate(examples)."""
    on_step: Callable[[int, float], None] = lambda step, loss: None
    """Called after each local step with (step, loss) for progress and the train-loss metric."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, filled by :meth:`phase` (e.g. "train", "project", "encode")."""
    losses: list[float] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block; with CUDA in use, its queued kernels are waited for at both ends
        (CUDA runs asynchronously: otherwise a phase's work would be billed to the next)."""
        import time

        _sync_cuda()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync_cuda()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _sync_cuda() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --- what every server does with a round's uploads ---------------------------------------------


def client_weights(uploads: list[Upload], weighting: str) -> list[float]:
    """Aggregation weights: n_i / sum n (``examples``) or 1 / m (``equal``)."""
    if weighting == "equal":
        return [1.0 / len(uploads)] * len(uploads)
    total = sum(u.num_examples for u in uploads)
    if total <= 0:
        raise wire.MessageError("uploads report no training examples")
    return [u.num_examples / total for u in uploads]


def decode_upload(upload: Upload, decode) -> Any:
    """``decode(upload.payload)``, with a MessageError naming the client if it is bad."""
    try:
        return decode(upload.payload)
    except wire.MessageError as e:
        raise wire.MessageError(f"client {upload.client_id}: {e}", upload.client_id) from None


MAX_EXAMPLES = 10**9
"""Largest example count an upload may report (its aggregation weight comes from it)."""


def check_uploads(uploads: list[Upload]) -> None:
    """One upload per client, each with a whole example count in [0, MAX_EXAMPLES]."""
    if not uploads:
        raise wire.MessageError("no uploads to aggregate")
    seen: set[int] = set()
    for u in uploads:
        if u.client_id in seen:
            raise wire.MessageError(f"client {u.client_id} uploaded twice in one round",
                                    u.client_id)
        seen.add(u.client_id)
        n = u.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_EXAMPLES:
            raise wire.MessageError(f"client {u.client_id}: example count {n!r} is not a whole "
                                    f"number in [0, {MAX_EXAMPLES}]", u.client_id)


def decode_uploads(uploads: list[Upload], decode) -> list[Any]:
    """Decode every upload before any state changes; name the client whose upload is bad."""
    check_uploads(uploads)
    return [decode_upload(u, decode) for u in uploads]


class Server(Protocol):
    aggregator: Any
    """``federation.aggregator`` as a ``robust.Rule`` (``robust.MEAN`` unless
    ``experiment.build_server`` sets another); a server that can apply a robust rule also has
    a ``robust_refusal(method_cfg) -> str | None`` classmethod (see ``methods.robust``)."""

    def download(self, round: int, since: int | None) -> bytes:
        """The message that brings a client at global round ``since`` to ``round``."""

    def aggregate(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        """Validate every upload (raise ``wire.MessageError`` naming the client, and leave the
        state untouched, if any is bad), then advance the global state from ``round`` to
        ``round + 1``. Returns method-specific metrics (may be empty)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors, numbers, lists (saved with torch.save)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Client(Protocol):
    model: torch.nn.Module

    def sync(self, download: bytes) -> None:
        """Bring ``self.model`` to the global state described by ``download``."""

    def fit(self, download: bytes, data: Any, ctx: FitContext) -> bytes:
        """Sync, train locally on ``data`` (a ``ClientData``), return the encoded upload."""


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to build each half of a method."""

    name: str
    method_id: int
    """Wire id, unique per method, part of the protocol: never reuse one."""
    config_cls: type
    make_server: Callable[..., Server]
    """The server class: ``make_server(cfg, initial: dict[str, Tensor], run_seed: int,
    weighting: str)``, where ``initial`` is the trainable state of the (prepared) model and
    ``weighting`` is ``"examples"`` (n_i / sum n) or ``"equal"``. Every method's server takes
    these four, used or not, so a spec names the class itself."""
    make_client: Callable[..., Client]
    """The client class: ``make_client(cfg, model, run_seed: int)``."""
    prepare_model: Callable[[torch.nn.Module, Any, int], torch.nn.Module] | None = None
    """Optional ``(model, cfg, run_seed) -> model``: wrap or freeze before training (LoRA
    adapters). Must be deterministic: every process calls it and must get the same model."""
    summary: str = ""


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The tensors a method trains, in the fixed order of ``model.named_parameters()``
    (which lists a tied weight once). This order is part of the wire protocol."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the initial global state a server starts
    from)."""
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
