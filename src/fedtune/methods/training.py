"""First-order local training, shared by FedAvg, Ferret, FedIT and FeDeRA.

It runs where the model is, in the model's dtype: batches are moved to the model's device by the
task, the loss is computed in float32 from upcast logits, gradients and optimiser state have the
parameters' dtype. A bfloat16 parameter keeps 8 significant bits, so an SGD step smaller than
half its spacing (|w| / 256) is lost; with small learning rates prefer a float32 model or LoRA
(whose adapters peft keeps in float32)."""

from __future__ import annotations

import torch

from fedtune.methods.base import FitContext, trainable_parameters
from fedtune.tasks import ClientData


class NonFiniteLossError(RuntimeError):
    """Raised when local training produces a NaN or infinite loss."""


def make_optimizer(params, train) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    raise ValueError(f"unknown optimizer {train.optimizer!r}: use 'sgd' or 'adamw'")


def local_train(model: torch.nn.Module, data: ClientData, ctx: FitContext) -> None:
    """``train.local_steps`` optimiser steps, each accumulating ``train.grad_accum`` mini-batches
    of ``train.batch_size``; each step's loss goes to ``ctx.losses`` and ``ctx.on_step``.
    Batches come from ``ctx.seed``, so a rerun (or a resumed run) sees the same batches."""
    train, task = ctx.train, ctx.task
    params = list(trainable_parameters(model).values())
    opt = make_optimizer(params, train)
    gen = torch.Generator().manual_seed(ctx.seed)
    batches = data.batches(train.batch_size, gen)
    model.train()
    for step in range(train.local_steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(train.grad_accum):
            batch = task.collate(next(batches))
            loss = task.loss(model, batch) / train.grad_accum
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"client {ctx.client_id} round {ctx.round} step {step}: loss is {loss.item()}; "
                    "lower train.lr"
                )
            loss.backward()
            step_loss += loss.item()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
        ctx.losses.append(step_loss)
        ctx.on_step(step, step_loss)
    model.eval()
    opt.zero_grad(set_to_none=True)
