"""What the ServerApp, the ClientApp and the launch helpers agree on: the run config keys, the
record layout of the messages, the offline environment, and the Flower app folder.

A round's message to a client is one ``ConfigRecord`` named ``fedtune`` holding the method's
encoded download as ``bytes`` (no re-encoding: the bytes the in-process engine hands to the
client half are the bytes that cross the network); the reply holds the encoded upload the same
way, plus the number of examples, the train loss and the per-phase timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedtune.config import ExperimentConfig, load_config, to_dict

RECORD = "fedtune"
"""Name of the ConfigRecord in every message's RecordDict."""

# Run config keys ([tool.flwr.app.config] of the app's pyproject.toml).
RUN_EXPERIMENT = "experiment"
"""The resolved experiment config as JSON (what ``fedtune flower`` sends); takes precedence."""
RUN_CONFIG_PATH = "config"
"""Or: a YAML config path readable by the ServerApp *and* every SuperNode, ..."""
RUN_OVERRIDES = "overrides"
"""... with space-separated ``key=value`` overrides on top."""
RUN_DIR = "run-dir"
"""The ServerApp's run folder (default: output.dir/output.name, as ``fedtune run``)."""
RUN_RESUME = "resume"
"""Continue the run in run-dir from its checkpoint (as ``fedtune run --resume``)."""
RUN_NODE_WAIT = "node-wait"
"""Seconds the ServerApp waits at the start for a SuperNode per partition (then it starts with
those that answered; the others count as dropped when sampled)."""

# Node config keys (flower-supernode --node-config).
NODE_PARTITION = "partition-id"
NODE_DATA_PATH = "data-path"
NODE_DEVICE = "device"
"""This SuperNode's ``model.device`` (default: the experiment's)."""
NODE_DTYPE = "dtype"
"""This SuperNode's ``model.dtype`` (default: the experiment's)."""


def node_overrides(node_config) -> list[str]:
    """The experiment overrides a SuperNode's node config asks for: its own data file, device
    and dtype. Device and dtype are each party's own (the wire dtype is the federation's)."""
    out = []
    path = str(node_config.get(NODE_DATA_PATH) or "")
    if path:
        out += [f"data.path={path}", "data.source=jsonl"]
    for key, field in ((NODE_DEVICE, "model.device"), (NODE_DTYPE, "model.dtype")):
        if str(node_config.get(key) or ""):
            out.append(f"{field}={node_config[key]}")
    return out


def node_config_text(partition: int, data_path: str | None = None, device: str | None = None,
                     dtype: str | None = None) -> str:
    """The ``flower-supernode --node-config`` value for a fedtune SuperNode."""
    text = f"{NODE_PARTITION}={partition}"
    for key, value in ((NODE_DATA_PATH, data_path), (NODE_DEVICE, device), (NODE_DTYPE, dtype)):
        if value:
            text += f' {key}="{value}"'
    return text

APP_REF_SERVER = "fedtune.engines.flower.serverapp:app"
APP_REF_CLIENT = "fedtune.engines.flower.clientapp:app"

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no telemetry events
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # no version check against flower.ai
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def offline_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: offline, and with this interpreter's scripts folder
    first on PATH (the SuperLink starts ``flower-superexec`` by name, which a virtual
    environment that was never activated would not provide)."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    scripts = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != scripts:
        env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    return env


def experiment_json(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


def config_key(text: str) -> str:
    """Short digest of a resolved config: the ClientApp keeps one client half per key."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_from_text(text: str, overrides: list[str]) -> ExperimentConfig:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)  # JSON is YAML
    try:
        return load_config(f.name, overrides)
    finally:
        os.unlink(f.name)


def config_from_run(run_config: dict[str, Any], extra: list[str] = ()) -> tuple[ExperimentConfig, str]:
    """The experiment config a run was started with, and its key; ``extra`` overrides are
    applied on top (a SuperNode's local data path)."""
    text = str(run_config.get(RUN_EXPERIMENT) or "")
    if text:
        cfg = _load_from_text(text, list(extra))
    else:
        path = str(run_config.get(RUN_CONFIG_PATH) or "") or None
        overrides = str(run_config.get(RUN_OVERRIDES) or "").split()
        cfg = load_config(path, [*overrides, *extra])
    return cfg, config_key(experiment_json(cfg))


APP_TOML = """\
# A Flower app that runs one fedtune experiment (written by `fedtune flower`).
# Start it with: flwr run {app_dir} <connection> [--run-config 'run-dir="..."']
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-flower"
version = "1.0.0"
description = "fedtune on Flower's Deployment Engine"
license = "Apache-2.0"
dependencies = []  # fedtune[flower] must be installed on every machine; nothing is installed at run time

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{client}"

[tool.flwr.app.config]
experiment = {experiment}
config = ""
overrides = ""
run-dir = {run_dir}
node-wait = {node_wait}
resume = false
"""


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def write_app(app_dir: str | Path, cfg: ExperimentConfig | None = None, run_dir: str = "",
              node_wait: float = 60.0) -> Path:
    """Write a Flower app folder (just a pyproject.toml: the code is the installed fedtune) whose
    default run config is ``cfg``, resolved."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    text = APP_TOML.format(app_dir=app_dir, server=APP_REF_SERVER, client=APP_REF_CLIENT,
                           experiment=_toml_str(experiment_json(cfg) if cfg else ""),
                           run_dir=_toml_str(str(run_dir)), node_wait=float(node_wait))
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir
