"""Everything an engine builds from a config before the first round: data, partitions, task,
model and the method's two halves. Shared by the in-process and the Flower engines so that both
run exactly the same experiment."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.config import ConfigError, ExperimentConfig
from fedtune.methods import privacy, robust
from fedtune.methods.base import Client, MethodSpec, Server, trainable_state
from fedtune.methods.registry import get_method
from fedtune.models import load_model, load_tokenizer, resolve_device
from fedtune.randomness import derive_seed
from fedtune.tasks import CausalLMTask, ClassificationTask, ClientData

SAMPLING_SALT = 0x5A3


@dataclass
class Experiment:
    cfg: ExperimentConfig
    tokenizer: Any
    task: CausalLMTask | ClassificationTask
    clients: list[ClientData]
    test: list[dict[str, Any]]
    labels: list[str] | None
    spec: MethodSpec
    method_cfg: Any


def seed_everything(seed: int) -> None:
    """Global RNGs too (dropout in encoders uses them); the engines reseed per client and round."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_task(cfg: ExperimentConfig, tokenizer, labels: list[str] | None):
    if cfg.classifier:
        return ClassificationTask(tokenizer, num_labels=len(labels or [0, 1]),
                                  max_length=cfg.data.max_length)
    return CausalLMTask(tokenizer, max_length=cfg.data.max_length)


def setup(cfg: ExperimentConfig, client_ids: list[int] | None = None) -> Experiment:
    """Load and encode the data, partition it, pick the method. ``client_ids`` limits which
    clients' data is encoded (a Flower SuperNode needs only its own)."""
    from fedtune.data import load_dataset, partition

    resolve_device(cfg.model)  # a GPU this machine lacks stops the run before any data loads
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, classifier=cfg.classifier)
    dataset = load_dataset(cfg.data, cfg.seed)
    task = make_task(cfg, tokenizer, dataset.labels)
    parts = partition(dataset.train, cfg.partition, cfg.seed)
    per_round = max(1, round(cfg.federation.clients_per_round * len(parts)))
    if cfg.federation.min_clients > per_round:
        raise ConfigError(
            f"federation.min_clients: {cfg.federation.min_clients} is more than the "
            f"{per_round} clients sampled per round ({cfg.federation.clients_per_round} of "
            f"{len(parts)}); lower it or raise federation.clients_per_round")
    wanted = range(len(parts)) if client_ids is None else client_ids
    clients = [ClientData([]) for _ in parts]
    for cid in wanted:
        if not 0 <= cid < len(parts):
            raise ValueError(f"client {cid} does not exist; the partition has {len(parts)} clients")
        clients[cid] = ClientData([task.encode(dataset.train[i]) for i in parts[cid]])
    test = [task.encode(e) for e in dataset.test[: cfg.eval.max_examples]]
    spec = get_method(cfg.method.name)
    return Experiment(cfg, tokenizer, task, clients, test, dataset.labels, spec,
                      cfg.method_config())


def build_model(exp: Experiment) -> torch.nn.Module:
    """The model at w0, prepared for the method (adapters wrapped, frozen parts frozen), on
    ``model.device`` in ``model.dtype``: this process's one copy of the model."""
    cfg = exp.cfg
    model = load_model(cfg.model, classifier=cfg.classifier, seed=cfg.seed,
                       tokenizer=exp.tokenizer, num_labels=len(exp.labels or [0, 1]))
    if exp.spec.prepare_model is not None:
        model = exp.spec.prepare_model(model, exp.method_cfg, cfg.seed)
    return model


@contextmanager
def _method_options_checked() -> Iterator[None]:
    """Options that only the model can check (Ferret's k against its blocks) raise ValueError
    when a half is built: that is the user's config, so it becomes a one-line ConfigError."""
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"method: {e}") from None


def build_client(exp: Experiment, model: torch.nn.Module) -> Client:
    with _method_options_checked():
        client = exp.spec.make_client(exp.method_cfg, model, exp.cfg.seed)
    mech = privacy.mechanism(exp.cfg, len(exp.clients))
    if mech is not None:  # validate() refused the methods privacy.refusal names
        client.privacy = mech
    return client


def build_server(exp: Experiment, model: torch.nn.Module) -> Server:
    """The server half, from the model's trainable state (on the model's device, in its dtype;
    each method's server decides where it keeps its state: FedAvg's and LoRA's on the CPU)."""
    with _method_options_checked():
        server = exp.spec.make_server(exp.method_cfg, trainable_state(model), exp.cfg.seed,
                                      exp.cfg.federation.weighting)
    f = exp.cfg.federation
    if f.aggregator != "mean":  # validate() refused the pairs robust.refusal names
        server.aggregator = robust.Rule(f.aggregator, f.trim)
    mech = privacy.mechanism(exp.cfg, len(exp.clients))
    if mech is not None:
        server.privacy = mech
    return server


def sample_clients(cfg: ExperimentConfig, round_: int, available: list[int]) -> list[int]:
    """The clients asked to train in ``round_``: a fraction of ``available``, at least one,
    drawn from (run seed, round) so every engine and every resume picks the same ones."""
    pool = sorted(available)
    k = max(1, round(cfg.federation.clients_per_round * len(pool)))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, round_, SAMPLING_SALT))
    order = torch.randperm(len(pool), generator=gen)[:k].tolist()
    return sorted(pool[i] for i in order)


def client_seed(cfg: ExperimentConfig, round_: int, client_id: int) -> int:
    """The seed of a client's local work in a round (batches, ZO seeds, dropout)."""
    return derive_seed(cfg.seed, round_, client_id)
