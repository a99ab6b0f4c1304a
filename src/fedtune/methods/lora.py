"""FedIT and FeDeRA: federated LoRA (``peft`` adapters), FedAvg over the adapter weights.

* FedIT: LoRA with peft's usual initialisation (A Kaiming-uniform, B zero) on the target modules.
* FeDeRA (Yan et al., 2024): the same adapters initialised from the SVD of the pretrained weight,
  ``W = U S V^T``, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` (``s`` = alpha / rank, the
  LoRA scaling), with the frozen residual ``W_res = W - s B A``, so the model's output at the start
  is the pretrained model's (the PiSSA decomposition).

Only the trainable tensors travel: the adapters and, for a sequence classifier, the
classification head (peft ``modules_to_save``). The server is FedAvg's :class:`WeightsServer`
over those tensors, so the messages are named-tensor messages whose names identify the modules
and a missing module, a wrong shape or a NaN is rejected before anything is applied.

Identical residual on every client. Every process builds ``W_res`` itself, deterministically:
``torch.linalg.svd`` on CPU is *not* reproducible across thread counts (MKL; measured: the
float32 and float64 factors of a 256 x 256 matrix change bytes between 1, 2 and 4 threads, and so
does peft's ``init_lora_weights="pissa"`` residual, a float32 SVD on the process's threads; for
512 x 512 even a float64 residual rounded to float32 does). Here the SVD and the residual are
computed in float64 on one thread and rounded once to the model dtype; tests/test_lora.py builds
the model in two processes with 1 and 3 threads and compares the bytes.
Because a different LAPACK build or CPU could still (rarely) round one element differently, every
upload carries a SHA-256 digest of the client's frozen adapted-module weights; the server pins the
first digest it accepts and rejects an upload whose base differs, instead of silently averaging
adapters that sit on different residuals.

Precision and place. The base model keeps ``model.dtype`` and ``model.device``; peft makes the
adapters float32 even on a bfloat16/float16 base (``autocast_adapter_dtype``, its default: the
adapter path computes in float32 and casts its output to the base's dtype), so the tensors that
are trained, sent and averaged are float32 everywhere. The server is FedAvg's: float32 on the
CPU, averaging in float32, rounding to the wire dtype once. FeDeRA's SVD and residual are always
computed on the CPU in float64 (the same bytes whatever the device), then rounded once to the base
weight's dtype and put on its device. The frozen base's digest covers its dtype, so clients whose
bases differ in dtype (one bfloat16, one float32) are refused as bases that differ: every client
of a LoRA federation uses the same ``model.dtype`` (the server's own dtype does not matter).

Upload = ``digest (32 bytes) | named tensors``; download = FedAvg's named tensors.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune import wire
from fedtune.methods.base import MethodSpec, Upload
from fedtune.methods.fedavg import WeightsClient, WeightsServer
from fedtune.randomness import derive_seed

FEDIT_ID = 6
FEDERA_ID = 7
DIGEST_SIZE = 32
ADAPTER = "default"
_INIT_SALT = 0x10A4  # separates the LoRA init stream from other uses of the run seed


@dataclass
class Config:
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the adapter output is scaled by alpha / rank."""
    target_modules: list[str] | None = None
    """Module names (suffixes) that get adapters. Default: the attention query and value
    projections for the model type (peft's table: q_proj/v_proj for Llama, query/value for
    BERT)."""
    dropout: float = 0.0
    """Dropout on the adapter input during local training."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and sent with the adapters. Default: the classification
    head of a sequence classifier (peft's ``classifier``/``score``), nothing for a causal LM."""
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the adapter weights on the wire (the server accumulates in float32)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank} must be at least 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha: {self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: {self.dropout} must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: give at least one module name (or null)")


# --- building the model ------------------------------------------------------------------------


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch CPU kernels on one thread (their results can depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _task_type(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    raise TypeError(f"LoRA methods support causal LMs and sequence classifiers, not {name}")


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The peft LoRA layers of ``model`` in module order."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


@torch.no_grad()
def svd_init_(model: torch.nn.Module) -> None:
    """FeDeRA / PiSSA initialisation of every LoRA layer, deterministically (on the CPU in
    float64 on one thread, whatever the model's device and dtype; each result rounded once to
    its tensor's dtype and copied to its device)."""
    with single_thread():
        for name, layer in lora_layers(model):
            base = layer.get_base_layer()
            if not isinstance(base, torch.nn.Linear):
                raise TypeError(f"{name}: SVD initialisation needs a Linear layer")
            r, s = layer.r[ADAPTER], layer.scaling[ADAPTER]
            w = base.weight.detach().to(device="cpu", dtype=torch.float64)
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sv[:r] / s).sqrt()
            b = u[:, :r] * root
            a = root[:, None] * vh[:r]
            residual = w - s * (b @ a)
            la, lb = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            la.copy_(a.to(la.dtype))
            lb.copy_(b.to(lb.dtype))
            base.weight.copy_(residual.to(base.weight.dtype))


def base_digest(model: torch.nn.Module) -> bytes:
    """SHA-256 of the frozen weights under every LoRA layer (the residuals for FeDeRA), with
    their names and shapes: equal digests mean the adapters sit on the same base."""
    h = hashlib.sha256()
    for name, layer in lora_layers(model):
        w = layer.get_base_layer().weight.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype};".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.dtype == torch.bfloat16
                 else w.numpy().tobytes())
    return h.digest()


def prepare_model(model: torch.nn.Module, cfg: Config, run_seed: int, *, init: str
                  ) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft). ``init`` is ``"lora"`` (FedIT: A random from
    the run seed, B zero) or ``"svd"`` (FeDeRA). Deterministic: the same model, config and seed
    give the same bytes in every process."""
    from peft import LoraConfig, get_peft_model

    if init not in ("lora", "svd"):
        raise ValueError(f"init must be 'lora' or 'svd', got {init!r}")
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules else None,
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        task_type=_task_type(model),
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run_seed, _INIT_SALT))
        peft_model = get_peft_model(model, lcfg)
    if not any(True for _ in lora_layers(peft_model)):
        raise ValueError(f"no module matched target_modules={cfg.target_modules}")
    if init == "svd":
        svd_init_(peft_model)
    peft_model.eval()
    return peft_model


# --- the two halves ---------------------------------------------------------------------------


class LoraServer(WeightsServer):
    """FedAvg over the adapter (and head) tensors; checks that every client's frozen base has
    the same digest (the first accepted one is pinned)."""

    def __init__(self, cfg: Config, initial: Mapping[str, torch.Tensor], run_seed: int,
                 weighting: str):
        super().__init__(cfg, initial, run_seed, weighting)
        self.base_digest: bytes | None = None
        self._pending: bytes | None = None

    def decode(self, payload: bytes, round: int) -> dict[str, torch.Tensor]:
        _, body = wire.unframe(payload, method_id=self.method_id, kind=wire.UP, round_=round)
        reader = wire.Reader(body)
        digest = bytes(reader.take(DIGEST_SIZE))
        tensors = wire.unpack_tensors(reader, self.expected())
        reader.done()
        if self._pending is None:
            self._pending = digest
        elif digest != self._pending:
            raise wire.MessageError(
                f"frozen base weights differ from the other clients' (digest {digest.hex()[:12]}"
                f" vs {self._pending.hex()[:12]}): every client must build the same model and "
                "residual (same model files, model.dtype, method config and run seed)")
        return tensors

    def aggregate(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        self._pending = self.base_digest
        metrics = super().aggregate(round, uploads)  # raises before any change if one is bad
        self.base_digest = self._pending
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_digest": self.base_digest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.base_digest = state.get("base_digest")


class LoraClient(WeightsClient):
    """Loads the global adapters, trains them (and the head) first-order, uploads them with the
    digest of its frozen base."""

    def __init__(self, cfg: Config, model: torch.nn.Module, run_seed: int):
        super().__init__(cfg, model, run_seed)
        self.digest = base_digest(model)
        self.upload_prefix = self.digest


def _spec(name: str, method_id: int, init: str, summary: str) -> MethodSpec:
    """FedIT and FeDeRA differ only in the adapters' initialisation and their wire id."""
    server = type(f"{name}Server", (LoraServer,), {"method_id": method_id})
    client = type(f"{name}Client", (LoraClient,), {"method_id": method_id})
    return MethodSpec(name=name, method_id=method_id, config_cls=Config, make_server=server,
                      make_client=client, prepare_model=functools.partial(prepare_model, init=init),
                      summary=summary)


fedit_spec = _spec("fedit", FEDIT_ID, "lora",
                   "LoRA adapters (A random, B zero), FedAvg over the adapter weights")
federa_spec = _spec("federa", FEDERA_ID, "svd",
                    "LoRA adapters from the SVD of the pretrained weights (frozen residual), "
                    "FedAvg over the adapter weights")
METHODS = [fedit_spec, federa_spec]
