"""Use what you trained: a finished run folder exported in the formats of the ecosystem, and the
tuned model answering an instruction.

A run folder holds ``config.yaml`` and ``model.safetensors`` with the *trainable* tensors only
(``runlog``). :func:`load_run` rebuilds the run's final model from them: the base model from the
config (``models.load_model``, tiny test models included), prepared by the method (LoRA adapters
wrapped; FeDeRA's residual recomputed, bit for bit, as every client computed it), the trained
tensors copied in. :func:`export_run` writes it out:

* full-parameter methods (FedAvg, FedZO, FedKSeed, FedKSeed-Pro, Ferret): a Hugging Face folder
  (``config.json``, ``model.safetensors`` in ``model.dtype``, the tokenizer, the generation
  config) that ``AutoModelForCausalLM.from_pretrained(OUT)`` and
  ``AutoTokenizer.from_pretrained(OUT)`` load offline;
* FedIT and FeDeRA: a peft adapter folder (``adapter_config.json``,
  ``adapter_model.safetensors``) for ``PeftModel.from_pretrained(base, OUT)`` on the *original*
  pretrained base; ``merge=True`` writes the merged Hugging Face folder instead.
  FeDeRA trains its adapters on a residual base ``W_res = W - s B0 A0`` (``methods/lora.py``), so
  its adapters alone are wrong on ``W``. The run's layer computes ``W_res + s B A
  = W + s (B A - B0 A0)``, and ``B A - B0 A0 = [B, -B0] [A; A0]``: an adapter of rank ``2r``
  with ``lora_alpha = 2 alpha`` (the same scaling ``s``) on the original base gives the run's
  outputs, up to the rounding of ``W_res`` to ``model.dtype`` (exact to float32 rounding in
  float32; in bfloat16 the residual's rounding is not low-rank and the merged export is the
  exact one). This is the idea of peft's PiSSA-to-LoRA conversion
  (``path_initial_model_for_weight_conversion``); ``B0, A0`` come from recomputing the SVD
  initialisation from the config instead of from a saved initial adapter.
* sequence classifiers: an ``AutoModelForSequenceClassification`` folder with ``id2label`` /
  ``label2id``. A mean-pooling classifier (MiniLM) is not a transformers architecture: its
  folder carries ``modeling_fedtune.py`` and an ``auto_map``, so it loads with
  ``trust_remote_code=True`` (without it transformers would build BERT's first-token pooler,
  randomly initialised: other logits). ``config.json`` notes ``fedtune_pooling``.

Every export also holds ``fedtune_export.json`` (what it is, from which run, how to load it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EXPORT_INFO = "fedtune_export.json"
LORA_METHODS = ("fedit", "federa")
MODELING_FILE = "modeling_fedtune.py"
MEAN_POOLING_CLASS = "MeanPoolingBertForSequenceClassification"


class ExportError(ValueError):
    """A run folder that cannot be exported or loaded (not a run, no saved model, tensors that
    do not fit the model its config builds); the message names the problem and the fix."""


@dataclass
class RunModel:
    """A run's final model rebuilt from its folder."""

    cfg: Any
    """The run's ``ExperimentConfig``."""
    tokenizer: Any
    model: torch.nn.Module
    """The model as the engine held it at the end (a ``PeftModel`` for FedIT / FeDeRA)."""
    labels: list[str] | None
    """Class names by index for a classifier, else None."""


# --- reading a run -----------------------------------------------------------------------------


def load_run_config(run_dir: str | Path, device: str | None = "cpu"):
    """The ``ExperimentConfig`` of ``run_dir`` (its ``config.yaml``), with ``model.device``
    replaced by ``device`` unless None. Not cross-validated: the run's data need not still be
    where it was, only its model."""
    import yaml

    from fedtune.config import ConfigError, ExperimentConfig, build

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir}: no config.yaml; is it a fedtune run folder?")
    try:
        cfg = build(ExperimentConfig, yaml.safe_load(path.read_text()) or {})
        cfg.method_config()
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None
    if device is not None:
        cfg.model.device = device
    return cfg


def labels_of(cfg) -> list[str] | None:
    if cfg.data.task != "classification":
        return None
    from fedtune.data.rotten_tomatoes import LABELS  # the one classification source

    return list(LABELS)


def build_base(cfg, tokenizer=None) -> torch.nn.Module:
    """The run's model before training (``w0``), not prepared by the method."""
    from fedtune.models import load_model, load_tokenizer

    labels = labels_of(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, classifier=labels is not None)
    return load_model(cfg.model, classifier=labels is not None, seed=cfg.seed,
                      tokenizer=tokenizer, num_labels=len(labels or [0, 1]))


def load_run(run_dir: str | Path, device: str | None = "cpu") -> RunModel:
    """The final model of the run in ``run_dir``: base from the config, prepared by the method,
    the trainable tensors of ``model.safetensors`` copied in (names, shapes and dtypes checked:
    every saved tensor must be a trainable parameter of the model the config builds, and every
    trainable parameter must be saved)."""
    from safetensors.torch import load_file

    from fedtune.methods.base import trainable_parameters
    from fedtune.methods.registry import get_method
    from fedtune.models import load_tokenizer

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, device)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{run_dir}: no model.safetensors; the run has not finished, or ran "
                          "with output.save_model=false (resume it to finish)")
    tokenizer = load_tokenizer(cfg.model, classifier=cfg.classifier)
    model = build_base(cfg, tokenizer)
    spec = get_method(cfg.method.name)
    if spec.prepare_model is not None:
        model = spec.prepare_model(model, cfg.method_config(), cfg.seed)
    params = trainable_parameters(model)
    saved = load_file(str(weights))
    extra = sorted(set(saved) - set(params))
    missing = sorted(set(params) - set(saved))
    if extra or missing:
        raise ExportError(
            f"{weights}: its tensors do not fit the model {run_dir / 'config.yaml'} builds "
            f"({len(extra)} unknown, e.g. {extra[:2]}; {len(missing)} missing, e.g. "
            f"{missing[:2]}); was the config edited after the run?")
    with torch.no_grad():
        for name, p in params.items():
            t = saved[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise ExportError(f"{weights}: {name} is {tuple(t.shape)} {t.dtype}, the model's "
                                  f"is {tuple(p.shape)} {p.dtype}")
            p.copy_(t.to(p.device))
    model.eval()
    return RunModel(cfg, tokenizer, model, labels_of(cfg))


# --- writing -----------------------------------------------------------------------------------


def _base_source(cfg) -> str | None:
    """The folder of the pretrained base a LoRA adapter applies to, when there is one on disk."""
    from fedtune.models import _folder

    if cfg.model.source in ("smollm2", "minilm", "hf"):
        return str(_folder(cfg.model))
    return None


def _is_mean_pooling(model: torch.nn.Module) -> bool:
    return type(model).__name__ == MEAN_POOLING_CLASS


MODELING_SOURCE = '''"""Written by fedtune export: the BERT classifier over the mean of the non-padding token
states (the pooling sentence encoders such as all-MiniLM-L6-v2 are trained with), for
AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)."""

import torch
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        self.bert.pooler = None

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = (torch.nn.functional.cross_entropy(logits.float(), labels)
                if labels is not None else None)
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''


def _label_config(model: torch.nn.Module, labels: list[str] | None) -> None:
    if labels is None:
        return
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


def _save_full(model: torch.nn.Module, run: RunModel, out: Path) -> dict[str, Any]:
    """``model`` (a plain transformers model) as a Hugging Face folder."""
    _label_config(model, run.labels)
    info: dict[str, Any] = {}
    if run.labels is not None:
        mean = _is_mean_pooling(model)
        model.config.fedtune_pooling = "mean" if mean else "cls"
        info["pooling"] = model.config.fedtune_pooling
        if mean:
            model.config.auto_map = {
                "AutoModelForSequenceClassification": f"modeling_fedtune.{MEAN_POOLING_CLASS}"}
            info["load"] = ("AutoModelForSequenceClassification.from_pretrained(OUT, "
                            "trust_remote_code=True)")
        else:
            info["load"] = "AutoModelForSequenceClassification.from_pretrained(OUT)"
    else:
        info["load"] = "AutoModelForCausalLM.from_pretrained(OUT)"
    model.save_pretrained(out)
    if run.labels is not None and _is_mean_pooling(model):
        (out / MODELING_FILE).write_text(MODELING_SOURCE)
    run.tokenizer.save_pretrained(out)
    return info


def _federa_to_lora(run: RunModel) -> torch.nn.Module:
    """A peft model on the original base whose rank-2r adapters ``[B, -B0] [A; A0]`` (alpha
    doubled: the same scaling) give the FeDeRA run's outputs; heads (modules_to_save) copied."""
    from peft import get_peft_model

    from fedtune.methods.base import trainable_parameters
    from fedtune.methods.lora import ADAPTER, lora_layers

    cfg = run.cfg
    method_cfg = cfg.method_config()
    init = get_method_prepare(cfg)(build_base(cfg, run.tokenizer), method_cfg, cfg.seed)
    initial = {name: (layer.lora_A[ADAPTER].weight.detach().clone(),
                      layer.lora_B[ADAPTER].weight.detach().clone())
               for name, layer in lora_layers(init)}
    del init
    run_conf = run.model.peft_config[ADAPTER]
    conf = dataclasses.replace(run_conf, r=2 * run_conf.r, lora_alpha=2 * run_conf.lora_alpha,
                               init_lora_weights=True, base_model_name_or_path=None)
    with torch.random.fork_rng(devices=[]):
        out = get_peft_model(build_base(cfg, run.tokenizer), conf)
    trained = dict(lora_layers(run.model))
    run_params = trainable_parameters(run.model)
    with torch.no_grad():
        for name, layer in lora_layers(out):
            a0, b0 = initial[name]
            src = trained[name]
            a, b = src.lora_A[ADAPTER].weight, src.lora_B[ADAPTER].weight
            if src.scaling[ADAPTER] != layer.scaling[ADAPTER]:
                raise AssertionError(f"{name}: scaling changed in the conversion")
            layer.lora_A[ADAPTER].weight.copy_(torch.cat([a, a0], dim=0))
            layer.lora_B[ADAPTER].weight.copy_(torch.cat([b, -b0], dim=1))
        for name, p in trainable_parameters(out).items():
            if ".lora_A." in name or ".lora_B." in name:
                continue
            p.copy_(run_params[name])  # modules_to_save: the classification head
    out.eval()
    return out


def get_method_prepare(cfg):
    from fedtune.methods.registry import get_method

    return get_method(cfg.method.name).prepare_model


def _save_adapter(peft_model, run: RunModel, out: Path) -> dict[str, Any]:
    from fedtune.methods.lora import ADAPTER

    conf = peft_model.peft_config[ADAPTER]
    conf.base_model_name_or_path = _base_source(run.cfg)
    peft_model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    auto = ("AutoModelForSequenceClassification" if run.labels is not None
            else "AutoModelForCausalLM")
    info: dict[str, Any] = {
        "load": f"PeftModel.from_pretrained({auto}.from_pretrained(BASE), OUT)",
        "base": conf.base_model_name_or_path,
        "rank": conf.r, "lora_alpha": conf.lora_alpha}
    if run.labels is not None:
        info["labels"] = run.labels
        if _is_mean_pooling(peft_model.get_base_model()):
            info["pooling"] = "mean"
            info["note"] = ("the base is the mean-pooling classifier fedtune builds "
                            "(fedtune.models.load_model); export with --merge for a folder that "
                            "loads on its own")
    return info


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside ``out``; ``out`` may be absent, empty or a previous
    export (replaced on success), nothing else."""
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
            raise ExportError(f"{out} is a non-empty folder that holds no fedtune export; "
                              "choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False,
               model: torch.nn.Module | None = None) -> Path:
    """Export the run in ``run_dir`` to the folder ``out`` (see the module docstring); returns
    ``out``. ``model``: the run's final model already in memory (the round loop's), used instead
    of rebuilding it for the exports that need no other copy (full-parameter methods, FedIT's
    adapter); it is not modified except for its config's label names. The folder appears
    complete or not at all (written beside it, then renamed)."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    lora = cfg.method.name in LORA_METHODS
    needs_rebuild = model is None or merge or cfg.method.name == "federa"
    if needs_rebuild:
        run = load_run(run_dir)
    else:
        from fedtune.models import load_tokenizer

        tok = load_tokenizer(cfg.model, classifier=cfg.classifier)
        run = RunModel(cfg, tok, model, labels_of(cfg))
    tmp = _prepare_out(out)
    try:
        if not lora:
            kind = "full"
            info = _save_full(run.model, run, tmp)
        elif merge:
            kind = "merged"
            info = _save_full(run.model.merge_and_unload(), run, tmp)
        else:
            kind = "adapter"
            peft_model = _federa_to_lora(run) if cfg.method.name == "federa" else run.model
            info = _save_adapter(peft_model, run, tmp)
            if cfg.method.name == "federa":
                info["conversion"] = ("FeDeRA residual adapters as a rank-2r LoRA on the "
                                      "original base: [B, -B0] [A; A0], alpha doubled")
        summary = run_dir / "summary.json"
        meta = {"kind": kind, "method": cfg.method.name, "run": str(run_dir.resolve()),
                "model_source": cfg.model.source, "dtype": cfg.model.dtype,
                "task": cfg.data.task, **info}
        if summary.is_file():
            s = json.loads(summary.read_text())
            meta["after"] = s.get("after")
            meta["rounds"] = s.get("rounds")
        (tmp / EXPORT_INFO).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- generation --------------------------------------------------------------------------------


def load_for_generation(path: str | Path):
    """(model, tokenizer) for a run folder (the run's final model, rebuilt), a Hugging Face
    folder, or a peft adapter folder whose ``base_model_name_or_path`` is a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.models import _quiet_transformers

    _quiet_transformers()
    path = Path(path)
    if (path / "config.yaml").is_file():
        run = load_run(path, device=None)
        if run.labels is not None:
            raise ExportError(f"{path} is a classification run; generate needs a causal LM")
        return run.model, run.tokenizer
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise ExportError(f"{path}: the adapter names no local base model ({base!r}); pass "
                              "the run folder instead, or export it with --merge")
        tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
        return model.eval(), AutoTokenizer.from_pretrained(tok_dir)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    raise ExportError(f"{path}: neither a run folder (config.yaml) nor a model folder "
                      "(config.json or adapter_config.json)")


@torch.no_grad()
def answer(model, tokenizer, instruction: str, input: str = "", *, max_new_tokens: int = 128,
           temperature: float = 0.0, seed: int = 0) -> str:
    """The model's answer to ``instruction`` (and ``input``) in the prompt template the runs
    train with (Alpaca, ``tasks.alpaca_prompt``): greedy, or sampled at ``temperature`` > 0
    from ``seed``."""
    from fedtune.tasks import alpaca_prompt

    ids = tokenizer(alpaca_prompt(instruction, input), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
        "do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    gen = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(gen[0, ids.shape[1]:].cpu(), skip_special_tokens=True).strip()
