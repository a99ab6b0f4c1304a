"""The config: defaults load, overrides apply, and every kind of mistake is one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedtune.config import ConfigError, load_config

from .conftest import BASE, REPO


def test_default_config_is_valid_and_embedded():
    cfg = load_config()
    assert (cfg.model.source, cfg.data.source, cfg.data.task) == ("minilm", "rotten_tomatoes",
                                                                  "classification")
    assert cfg.method.name == "federa" and cfg.method_config().rank == 16
    assert cfg.federation.rounds >= 1


def test_overrides_are_typed_and_reach_method_options(tmp_path):
    cfg = load_config(BASE, ["federation.rounds=7", "train.lr=0.5", "train.optimizer=adamw",
                             "federation.clients_per_round=1", "method.name=fedavg",
                             "method.wire_dtype=bfloat16"])
    assert cfg.federation.rounds == 7
    assert cfg.train.lr == 0.5 and isinstance(cfg.federation.clients_per_round, float)
    assert cfg.train.optimizer == "adamw"
    assert cfg.method_config().wire_dtype == "bfloat16"


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a float field takes it as the number it means.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\nmethod:\n  name: fedkseed\n  eta: 5E-6\n")
    cfg = load_config(path, ["train.max_grad_norm=2e+1"])
    assert cfg.train.lr == 0.001 and cfg.method_config().eta == 5e-6
    assert cfg.train.max_grad_norm == 20.0
    with pytest.raises(ConfigError, match="'1e-3x' is not a number"):
        load_config(BASE, ["train.lr=1e-3x"])


def test_model_device_and_source_config(tmp_path):
    assert load_config().model.device == "auto"
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert load_config(BASE, [f"model.device={device}"]).model.device == device
    # a config may name a GPU this machine lacks (it is checked where the model is built)
    assert load_config(BASE, ["model.device=cuda:7"]).model.device == "cuda:7"
    shape = REPO / "benchmarks" / "configs" / "llama-3.2-1b.json"
    for path in (shape, tmp_path):
        if path == tmp_path:
            (tmp_path / "config.json").write_text(shape.read_text())
        cfg = load_config(BASE, ["model.source=config", f"model.path={path}",
                                 "model.dtype=bfloat16"])
        assert cfg.model.source == "config" and cfg.model.dtype == "bfloat16"


def test_yaml_file_with_method_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 2\nmethod:\n  name: fedavg\n  wire_dtype: float16\n")
    cfg = load_config(path, ["federation.rounds=4"])
    assert cfg.federation.rounds == 4
    assert cfg.method_config().wire_dtype == "float16"


@pytest.mark.parametrize("overrides, name, options", [
    ([], "federa", {"rank": 16, "alpha": 32}),
    (["method.name=federa", "method.rank=4"], "federa", {"rank": 4, "alpha": 32}),
    (["method.name=ferret"], "ferret", {}),
    (["method.name=fedit", "method.rank=4"], "fedit", {"rank": 4}),
    (["method.rank=4", "method.name=fedit"], "fedit", {"rank": 4}),
    (["method.name=ferret", "method.name=federa"], "federa", {"rank": 16, "alpha": 32}),
])
def test_switching_methods_leaves_the_base_options_behind(tmp_path, overrides, name, options):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: federa\n  rank: 16\n  alpha: 32\n")
    cfg = load_config(path, overrides)
    assert (cfg.method.name, cfg.method.options) == (name, options)


def test_a_switch_keeps_checking_the_options_against_the_new_method(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: federa\n  rank: 16\n")
    with pytest.raises(ConfigError, match="method.rank: unknown key"):
        load_config(path, ["method.name=ferret", "method.rank=4"])
    with pytest.raises(ConfigError, match="method.k: unknown key"):
        load_config(path, ["method.k=64"])
    assert load_config(path, ["method.name=ferret", "method.k=64"]).method_config().k == 64
    # the embedded default names its method's options too; any method can replace it
    for method in ("fedavg", "ferret", "fedkseed", "fedit"):
        assert load_config(None, [f"method.name={method}"]).method.name == method


@pytest.mark.parametrize("override, fragment", [
    (["federation.roundz=3"], "federation.roundz: unknown key (did you mean 'rounds'?)"),
    (["federation.rounds=three"], "federation.rounds: 'three' is not an integer"),
    (["federation.clients_per_round=1.5"], "federation.clients_per_round: 1.5 must be in (0, 1]"),
    (["partition.num_clients=0"], "partition.num_clients: 0 must be at least 1"),
    (["train.optimizer=adam"], "train.optimizer: 'adam' is not allowed; use one of 'sgd', 'adamw'"),
    (["data.source=jsonl", "data.path=/nonexistent/x.jsonl"], "data.path: '/nonexistent/x.jsonl' does not exist"),
    (["data.source=jsonl"], "data.path: required for data.source=jsonl"),
    (["method.name=nope"], "method.name: 'nope' is not a method"),
    (["method.wire_dtype=int8"], "method.wire_dtype: 'int8' is not allowed"),
    (["method.bogus=1"], "method.bogus: unknown key"),
    (["rounds"], "must look like key=value"),
    (["model.device=gpu"], "model.device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    (["model.device=cuda:x"], "model.device: 'cuda:x' is not a device"),
    (["model.dtype=float64"], "model.dtype: 'float64' is not allowed"),
    (["model.source=config"], "model.path: required for model.source=config"),
    (["model.source=config", "model.path=/no/such/config.json"],
     "model.path: '/no/such/config.json' is neither a config.json nor a folder holding one"),
    (["model.source=config", f"model.path={REPO / 'benchmarks/configs/llama-3.2-1b.json'}",
      "data.task=classification"], "model.source: 'config' builds a causal LM"),
])
def test_bad_configs_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, override)
    assert fragment in str(e.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("args", [
    ["run", "federation.clients_per_round=2"],
    ["run", "data.source=natural_instructions", "data.path=/no/such/folder"],
    ["run", "/no/such/config.yaml"],
    ["run", "--resume", "/no/such/run"],
])
def test_cli_user_errors_exit_2_with_one_line(args):
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, check=False,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_config_field_has_a_docstring():
    """The README promises every key is documented in config.py: each dataclass field there
    (and in every method's Config) is followed by its docstring."""
    import ast
    import inspect

    from fedtune import config
    from fedtune.methods import registry

    modules = {config, *(inspect.getmodule(s.config_cls) for s in registry.METHODS.values())}
    missing = []
    for module in modules:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if not (isinstance(node, ast.ClassDef) and node.name.endswith("Config")):
                continue
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                            and isinstance(nxt.value.value, str)):
                        missing.append(f"{module.__name__}.{node.name}.{stmt.target.id}")
    assert missing == []
