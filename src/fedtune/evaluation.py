"""Evaluation: held-out loss, Rouge-L of batched greedy generations, accuracy where the task has
labels. Rouge-L is the F-measure of the ``rouge-score`` package with its default tokenizer, or
with ``eval.rouge: rouge`` that of the ``rouge`` 1.0.1 package, which the Ferret and FedKSeed
reference code score with (it splits on whitespace and ``.`` without lowercasing or dropping
punctuation, and counts each distinct word once, so its numbers differ).

The model runs on its own device in its own dtype; losses are computed in float32 from upcast
logits (``tasks``) and summed in float64 on the CPU, so a bfloat16 model's loss is comparable
with a float32 one's (they differ by what the bfloat16 weights and activations change, not by
how the loss is added up)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.tasks import CausalLMTask, ClassificationTask

SCORERS = {
    "rouge_score": "rouge-score RougeL F-measure (default tokenizer)",
    "rouge": "rouge 1.0.1 rouge-l F-measure (the Ferret / FedKSeed reference code's scorer)",
}
"""``eval.rouge`` -> the name reports and ``summary.json`` give the scorer."""
SCORER_NAME = SCORERS["rouge_score"]
BASELINE_KEYS = ("accuracy_majority", "rouge_l_empty", "rouge_l_copy")
"""The trivial baselines :func:`baselines` reports beside the metrics (once, at round 0)."""


@torch.no_grad()
def evaluation_loss(model, task, examples: Sequence[dict], batch_size: int) -> float:
    """Mean loss over ``examples``: per response token for a causal LM (every token counts the
    same, whatever its batch), per example for a classifier."""
    model.eval()
    if isinstance(task, CausalLMTask):
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(examples), batch_size):
            batch = task.collate(examples[i : i + batch_size])
            total += task.token_losses(model, batch).cpu().double()
        return (total[0] / total[1].clamp(min=1)).item()
    loss, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        loss += task.loss(model, task.collate(chunk)).item() * len(chunk)
        n += len(chunk)
    return loss / max(n, 1)


@torch.no_grad()
def classification_accuracy(model, task: ClassificationTask, examples, batch_size: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = task.collate(examples[i : i + batch_size])
        correct += (task.logits(model, batch).argmax(-1).cpu() == batch["labels"]).sum().item()
    return correct / max(len(examples), 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int, max_prompt_tokens: int = 1024) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
               for p in prompts[i : i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for j, x in enumerate(ids):
            input_ids[j, width - len(x):] = torch.tensor(x)
            mask[j, width - len(x):] = 1
        device = next(model.parameters()).device
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_token_id)
        for row in gen[:, width:].cpu():
            outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outs


def rouge_l(predictions: Sequence[str], references: Sequence[str],
            scorer: str = "rouge_score") -> float:
    """Mean Rouge-L F-measure of ``predictions`` against ``references``, with ``scorer`` (an
    ``eval.rouge`` value: ``rouge_score`` or ``rouge``)."""
    if scorer == "rouge":
        scores = [_rouge_package_f(pred, ref) for pred, ref in zip(predictions, references)]
    elif scorer == "rouge_score":
        from rouge_score import rouge_scorer

        rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [rs.score(ref, pred)["rougeL"].fmeasure
                  for pred, ref in zip(predictions, references)]
    else:
        raise ValueError(f"unknown Rouge scorer {scorer!r}; use one of {', '.join(SCORERS)}")
    return sum(scores) / max(len(scores), 1)


def _rouge_package_f(prediction: str, reference: str) -> float:
    """The ``rouge`` package's rouge-l F-measure of one pair. It raises ValueError when either
    text has no sentence left after splitting on "." (an empty string, or only dots); such a
    pair shares no words, so it scores 0, as the FedKSeed code scores an empty generation."""
    from rouge import Rouge

    try:
        return Rouge(metrics=["rouge-l"]).get_scores(prediction, reference)[0]["rouge-l"]["f"]
    except ValueError:
        return 0.0


def label_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of generations whose first word is the reference label (case-insensitive)."""
    def first_word(s: str) -> str:
        words = s.strip().split()
        return words[0].strip(".,!:;\"'").lower() if words else ""

    hits = [first_word(p) == r.strip().lower() for p, r in zip(predictions, references)]
    return sum(hits) / max(len(hits), 1)


def majority_share(values: Sequence[Any]) -> float:
    """The share of the most frequent value: the accuracy of always answering it."""
    if not values:
        return 0.0
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts.values()) / len(values)


_INPUT_MARK = "\n\n### Input:\n"
_RESPONSE_MARK = "\n\n### Response:\n"


def prompt_input(prompt: str) -> str:
    """The input inside an Alpaca prompt (``tasks.alpaca_prompt``); "" when it has none."""
    head, mark, _ = prompt.rpartition(_RESPONSE_MARK)
    if not mark or _INPUT_MARK not in head:
        return ""
    return head.split(_INPUT_MARK, 1)[1]


def baselines(task, examples: Sequence[dict], cfg_eval, *, labels=None) -> dict[str, float]:
    """What trivial answers score on the examples the metrics are computed on, so that a metric
    can be read against them: a classifier's ``accuracy_majority`` (always the most frequent
    label of the evaluation set); an instruction task's ``rouge_l_empty`` (an empty answer) and
    ``rouge_l_copy`` (the input copied as the answer), and ``accuracy_majority`` when its
    answers are labels (always the most frequent reference), over the generated examples."""
    ex = list(examples[: cfg_eval.max_examples])
    if isinstance(task, ClassificationTask):
        return {"accuracy_majority": majority_share([e["label"] for e in ex])}
    if not cfg_eval.generate:
        return {}
    gen_ex = ex[: cfg_eval.generate_examples]
    refs = [e["reference"] for e in gen_ex]
    scorer = cfg_eval.rouge
    out = {"rouge_l_empty": rouge_l([""] * len(refs), refs, scorer),
           "rouge_l_copy": rouge_l([prompt_input(e["prompt"]) for e in gen_ex], refs, scorer)}
    if labels:
        out["accuracy_majority"] = majority_share([r.strip().lower() for r in refs])
    return out


def evaluate(model, task, tokenizer, examples: Sequence[dict], cfg_eval, *, labels=None,
             generate_now: bool, with_baselines: bool = False) -> dict[str, Any]:
    """The round's evaluation metrics: ``eval_loss`` always; ``accuracy`` for classifiers;
    ``rouge_l`` (and ``accuracy`` when the task has labels) for instruction tasks when
    ``generate_now``; with ``with_baselines`` (round 0) also :func:`baselines`."""
    ex = list(examples[: cfg_eval.max_examples])
    out: dict[str, Any] = {"eval_loss": evaluation_loss(model, task, ex, cfg_eval.batch_size)}
    if with_baselines:
        out.update(baselines(task, ex, cfg_eval, labels=labels))
        if not isinstance(task, ClassificationTask) and cfg_eval.generate:
            out["rouge_scorer"] = SCORERS[cfg_eval.rouge]
    if isinstance(task, ClassificationTask):
        out["accuracy"] = classification_accuracy(model, task, ex, cfg_eval.batch_size)
        return out
    if generate_now and cfg_eval.generate:
        gen_ex = ex[: cfg_eval.generate_examples]
        preds = generate(model, tokenizer, [e["prompt"] for e in gen_ex], cfg_eval.max_new_tokens,
                         cfg_eval.batch_size)
        refs = [e["reference"] for e in gen_ex]
        out["rouge_l"] = rouge_l(preds, refs, cfg_eval.rouge)
        if labels:
            out["accuracy"] = label_accuracy(preds, refs)
        out["samples"] = [{"prediction": p, "reference": r} for p, r in zip(preds[:3], refs[:3])]
    return out
