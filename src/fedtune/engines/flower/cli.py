"""``fedtune flower ...``: run an experiment on Flower's Deployment Engine.

    fedtune flower local [CONFIG] [key=value ...] [--nodes N] [--tls] [--auth] [--out RUN_DIR]
        a SuperLink and N SuperNodes on this machine, one run, everything stopped at the end
    fedtune flower app DIR [CONFIG] [key=value ...] [--out RUN_DIR]
        write a Flower app folder for `flwr run DIR <connection>` (the experiment is in it)
    fedtune flower supernode --superlink HOST:PORT --partition N [--data-path FILE]
                             [--device auto|cpu|cuda|cuda:N] [--dtype float32|bfloat16|float16]
        on a client machine: a SuperNode and its long-lived fedtune ClientApp process; device
        and dtype are this node's own (default: the experiment's model.device / model.dtype)
    fedtune flower certs DIR --host HOST [--host ...]
        a CA and a SuperLink certificate for HOST (for a trial; use your own CA in production)
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flower", help="run on Flower (SuperLink + SuperNodes)")
    sub = p.add_subparsers(dest="flower_command", required=True)

    loc = sub.add_parser("local", help="a SuperLink and N SuperNodes on this machine, one run")
    loc.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    loc.add_argument("--nodes", type=int, default=None,
                     help="SuperNodes, one per partition 0..N-1 (default: partition.num_clients)")
    loc.add_argument("--out", metavar="RUN_DIR", help="run folder (default: output.dir/NAME)")
    loc.add_argument("--workdir", help="logs, keys, certificates, FLWR_HOME (default: "
                                       "RUN_DIR/flower)")
    loc.add_argument("--tls", action="store_true", help="TLS with a CA generated for the trial")
    loc.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
    loc.add_argument("--threads", type=int, default=0, help="torch threads per SuperNode")
    loc.add_argument("--node-device", action="append", default=[], metavar="P=DEVICE",
                     help="the model.device of partition P's SuperNode (repeatable; default: "
                          "the config's, which the ServerApp uses)")
    loc.add_argument("--node-dtype", action="append", default=[], metavar="P=DTYPE",
                     help="the model.dtype of partition P's SuperNode (repeatable)")
    loc.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for the run")

    app = sub.add_parser("app", help="write a Flower app folder for `flwr run`")
    app.add_argument("dir")
    app.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    app.add_argument("--out", metavar="RUN_DIR", default="",
                     help="the ServerApp's run folder (on the SuperLink's machine)")
    app.add_argument("--node-wait", type=float, default=60.0,
                     help="seconds the ServerApp waits for a SuperNode per partition")

    sn = sub.add_parser("supernode", help="a SuperNode with a long-lived fedtune ClientApp")
    sn.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:PORT")
    sn.add_argument("--partition", type=int, required=True, help="which client this node is")
    sn.add_argument("--data-path", help="this client's own instruction JSONL (default: its "
                                        "partition of the experiment's data)")
    sn.add_argument("--root-certificates", help="CA certificate of the SuperLink (TLS)")
    sn.add_argument("--insecure", action="store_true", help="no TLS (trials only)")
    sn.add_argument("--auth-key", help="this node's private key (SuperNode authentication)")
    sn.add_argument("--runtime-port", type=int, default=9094,
                    help="local port between the SuperNode and its ClientApp process")
    sn.add_argument("--threads", type=int, default=0, help="torch threads")
    sn.add_argument("--device", help="this node's model.device: auto, cpu, cuda or cuda:N "
                                     "(default: the experiment's)")
    sn.add_argument("--dtype", choices=DTYPE_CHOICES,
                    help="this node's model.dtype (default: the experiment's)")

    certs = sub.add_parser("certs", help="a trial CA and SuperLink certificate")
    certs.add_argument("dir")
    certs.add_argument("--host", action="append", default=[],
                       help="name or IP the SuperNodes use to reach the SuperLink (repeatable)")


DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _check_device(value: str, what: str) -> str:
    from fedtune.config import DEVICE, ConfigError

    if DEVICE.fullmatch(value) is None:
        raise ConfigError(f"{what}: {value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


def _per_node(items: list[str], what: str, check) -> dict[int, str]:
    """``["0=cuda:0", "1=cpu"]`` -> {0: "cuda:0", 1: "cpu"}, each value checked."""
    from fedtune.config import ConfigError

    out = {}
    for item in items:
        part, sep, value = item.partition("=")
        if not sep or not part.strip().isdigit():
            raise ConfigError(f"{what} {item!r}: use PARTITION=VALUE, e.g. 0=cuda:0")
        out[int(part)] = check(value.strip(), f"{what} {item}")
    return out


def _check_dtype(value: str, what: str) -> str:
    from fedtune.config import ConfigError

    if value not in DTYPE_CHOICES:
        raise ConfigError(f"{what}: {value!r} is not a dtype; use {', '.join(DTYPE_CHOICES)}")
    return value


def _load(items: list[str]):
    from fedtune.config import load_config

    if items and "=" not in items[0]:
        return load_config(items[0], items[1:])
    return load_config(None, items)


def handle(args) -> int:
    return {"local": _local, "app": _app, "supernode": _supernode,
            "certs": _certs}[args.flower_command](args)


def _local(args) -> int:
    from fedtune.engines.flower.launch import LocalFederation
    from fedtune.engines.rounds import default_run_dir, summary_table

    cfg = _load(args.items)
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    workdir = Path(args.workdir) if args.workdir else run_dir / "flower"
    n = args.nodes or cfg.partition.num_clients
    devices = _per_node(args.node_device, "--node-device", _check_device)
    dtypes = _per_node(args.node_dtype, "--node-dtype", _check_dtype)
    print(f"fedtune flower: SuperLink and {n} SuperNodes on 127.0.0.1 (logs in {workdir / 'logs'})",
          file=sys.stderr)
    with LocalFederation(workdir, list(range(n)), tls=args.tls, auth=args.auth,
                         threads=args.threads, devices=devices, dtypes=dtypes) as fed:
        run_id = fed.submit(cfg, run_dir)
        print(f"fedtune flower: run {run_id} -> {run_dir} (follow it with: FLWR_HOME="
              f"{fed.env['FLWR_HOME']} flwr log {run_id} fedtune-local)", file=sys.stderr)
        rows = fed.wait(run_id, run_dir, timeout=args.timeout)
    print(summary_table(rows))
    return 0


def _app(args) -> int:
    from fedtune.engines.flower.common import write_app

    cfg = _load(args.items)
    out = str(Path(args.out).resolve()) if args.out else ""
    app = write_app(args.dir, cfg, run_dir=out, node_wait=args.node_wait)
    print(f"wrote {app / 'pyproject.toml'}; start the run with:\n"
          f"  flwr run {app} <connection>")
    return 0


def _supernode(args) -> int:
    from fedtune.engines.flower.common import node_config_text, offline_env
    from fedtune.engines.flower.launch import _bin

    device = _check_device(args.device, "--device") if args.device else None
    node_config = node_config_text(
        args.partition, str(Path(args.data_path).resolve()) if args.data_path else None,
        device, args.dtype)
    cmd = [_bin("flower-supernode"), "--superlink", args.superlink, "--isolation", "process",
           "--host", "127.0.0.1", "--port", str(args.runtime_port), "--node-config", node_config]
    if args.root_certificates:
        cmd += ["--root-certificates", args.root_certificates]
    elif args.insecure:
        cmd += ["--insecure"]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", args.auth_key]
    env = offline_env()
    node = subprocess.Popen(cmd, env=env)
    worker_cmd = [sys.executable, "-m", "fedtune.engines.flower.worker",
                  "--runtime-api-address", f"127.0.0.1:{args.runtime_port}",
                  "--parent-pid", str(node.pid)]
    if args.threads:
        worker_cmd += ["--threads", str(args.threads)]
    time.sleep(1.0)
    worker = subprocess.Popen(worker_cmd, env=env)
    try:
        while node.poll() is None and worker.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        for p in (worker, node):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (worker, node):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return node.returncode or 0


def _certs(args) -> int:
    from fedtune.engines.flower.launch import make_tls

    hosts = tuple(args.host) or ("127.0.0.1", "localhost")
    paths = make_tls(Path(args.dir), hosts)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
