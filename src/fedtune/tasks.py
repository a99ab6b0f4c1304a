"""Tasks: how examples become tensors and what loss a model is trained on.

Two tasks cover the methods' papers:

* :class:`CausalLMTask`: instruction tuning; an example is a prompt (Alpaca template) and a
  response, and the loss counts the response tokens only.
* :class:`ClassificationTask`: sequence classification with an encoder (accuracy is the metric).

A task turns raw examples (dicts) into encoded ones once, up front; ``collate`` pads a list of
encoded examples into a batch (CPU tensors); ``loss`` moves the batch to the model's device and
returns the mean training loss, computed in float32 from upcast logits whatever the model's
dtype (so bfloat16 and float32 runs report comparable numbers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt template (the one FedKSeed and Ferret use for instruction tuning)."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def on_model_device(batch: dict[str, torch.Tensor], model: torch.nn.Module
                    ) -> dict[str, torch.Tensor]:
    """``batch`` on the device of ``model``'s parameters."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class ClientData:
    """One client's encoded training examples."""

    examples: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[dict]]:
        """Endless mini-batches: a fresh permutation each pass, the last short batch dropped
        unless the client has fewer examples than ``batch_size``."""
        n = len(self.examples)
        if n == 0:
            raise ValueError("client has no examples")
        bs = min(batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator).tolist()
            for i in range(0, n - bs + 1, bs):
                yield [self.examples[j] for j in order[i : i + bs]]


class CausalLMTask:
    """Instruction tuning of a causal LM. Raw example keys: ``instruction``, ``input``
    (may be empty), ``output``."""

    def __init__(self, tokenizer, max_length: int = 512):
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def prompt(self, ex: dict[str, Any]) -> str:
        return alpaca_prompt(ex["instruction"], ex.get("input", ""))

    def encode(self, ex: dict[str, Any]) -> dict[str, Any]:
        """Token ids of prompt + response + EOS; labels are IGNORE on the prompt. A too-long
        example is cut from the left of the prompt so the response survives."""
        tok = self.tokenizer
        prompt_ids = tok(self.prompt(ex), add_special_tokens=False)["input_ids"]
        resp_ids = tok(ex["output"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            resp_ids = resp_ids + [tok.eos_token_id]
        resp_ids = resp_ids[: self.max_length // 2] if len(resp_ids) > self.max_length else resp_ids
        keep_prompt = max(self.max_length - len(resp_ids), 1)
        prompt_ids = prompt_ids[-keep_prompt:]
        return {
            "input_ids": prompt_ids + resp_ids,
            "labels": [IGNORE] * len(prompt_ids) + resp_ids,
            "prompt_len": len(prompt_ids),
            "reference": ex["output"],
            "prompt": self.prompt(ex),
        }

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed loss and the count of response tokens, as a 2-vector (for exact averaging
        over batches of different sizes)."""
        batch = on_model_device(batch, model)
        labels = batch["labels"]
        # Only positions that predict a response token need logits: the vocabulary projection
        # and its softmax are skipped for the prompt (most of the tokens in instruction data).
        keep = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep: compute all, then select
            logits = model(**inputs).logits[:, keep, :]
        target = labels[:, keep + 1]
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        count = (target != IGNORE).sum()
        return torch.stack([total, count.to(total.dtype)])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over response tokens."""
        total, count = self.token_losses(model, batch)
        return total / count.clamp(min=1)


class ClassificationTask:
    """Sequence classification. Raw example keys: ``text`` and ``label`` (an int)."""

    def __init__(self, tokenizer, num_labels: int, max_length: int = 128):
        self.tokenizer = tokenizer
        self.num_labels = num_labels
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id or 0

    def encode(self, ex: dict[str, Any]) -> dict[str, Any]:
        ids = self.tokenizer(ex["text"], truncation=True, max_length=self.max_length)["input_ids"]
        label = int(ex["label"])
        if not 0 <= label < self.num_labels:
            raise ValueError(f"label {label} outside 0..{self.num_labels - 1}")
        return {"input_ids": ids, "label": label}

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The class logits, upcast to float32, on the model's device."""
        batch = on_model_device(batch, model)
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.logits(model, batch)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))
