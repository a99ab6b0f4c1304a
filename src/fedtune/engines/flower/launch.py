"""Start a SuperLink and N SuperNodes on this machine, submit a fedtune run, wait for it, stop
everything: what ``fedtune flower local`` does, and what the tests and the benchmark use.

Every process gets the offline environment (no telemetry, no update check, no Hugging Face Hub),
the SuperLink runs with ``--disable-runtime-dependency-installation``, and nothing listens beyond
127.0.0.1. Optional TLS (a CA and a server certificate for 127.0.0.1/localhost generated here)
and SuperNode authentication (an EC P-384 key per SuperNode, registered with
``flwr supernode register``). Each SuperNode runs with ``--isolation process`` beside a
long-lived fedtune ClientApp worker (``worker.py``) that keeps the client half across rounds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.config import ExperimentConfig
from fedtune.engines.flower.common import node_config_text, offline_env, write_app

CONNECTION = "fedtune-local"


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; tests running in parallel get different
    ones)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_if_failed(run_dir: Path) -> None:
    """Raise with the ServerApp's error if the run writing to ``run_dir`` failed."""
    if (run_dir / "error.txt").is_file():
        raise RuntimeError(f"the ServerApp failed:\n{(run_dir / 'error.txt').read_text()}")


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# --- certificates and keys --------------------------------------------------------------------


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A throwaway CA and a server certificate signed by it for ``hosts`` (PEM files)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what flower-supernode and ``flwr supernode
    register`` read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


# --- processes --------------------------------------------------------------------------------


@dataclass
class Node:
    partition: int
    runtime_port: int
    supernode: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    key: Path | None = None
    registered: bool = True
    data_path: str | None = None

    def procs(self) -> list[subprocess.Popen]:
        return [p for p in (self.worker, self.supernode) if p is not None]


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1. Use as a context manager: every process it
    started is stopped on exit, whatever happened."""

    workdir: Path
    partitions: list[int]
    tls: bool = False
    auth: bool = False
    data_paths: dict[int, str] = field(default_factory=dict)
    threads: int = 0
    """torch threads per ClientApp worker (0: torch's default)."""
    devices: dict[int, str] = field(default_factory=dict)
    """partition -> that SuperNode's model.device (default: the experiment's)."""
    dtypes: dict[int, str] = field(default_factory=dict)
    """partition -> that SuperNode's model.dtype (default: the experiment's)."""
    own_worker: bool = True
    """SuperNodes with ``--isolation process`` and a long-lived fedtune ClientApp worker; False:
    Flower's default ``--isolation subprocess`` (a new ClientApp process per message)."""
    simulation: bool = False
    """Flower's Simulation Engine (Ray, ``pip install "flwr[simulation]"``): no SuperNodes; the
    SuperLink runs ``len(partitions)`` virtual SuperNodes (partition ids 0..N-1) in Ray actors."""
    sim_cpus_per_client: int = 1
    verbose: bool = False

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = offline_env()
        self.env["FLWR_HOME"] = str(self.workdir / "flwr-home")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[Node] = []
        self.certs: dict[str, Path] = {}
        self._all: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.logs / log, "ab")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                             cwd=self.workdir, start_new_session=True)
        out.close()
        self._all.append(p)
        return p

    def _wait_port(self, port: int, timeout: float = 60.0, proc=None, what="") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}; see {self.logs}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{what} did not listen on port {port} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation's SuperLink."""
        return subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> LocalFederation:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.simulation:
            cmd += ["--simulation"]
            if self.tls or self.auth:
                raise ValueError("the Simulation Engine runs on one machine: no TLS or auth")
            # one Ray actor serves many clients: keep every client's half (and model) alive
            self.env.setdefault("FEDTUNE_FLOWER_HALVES", str(len(self.partitions)))
        if self.tls:
            self.certs = make_tls(self.workdir / "certs")
            cmd += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile",
                    str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
        else:
            cmd += ["--insecure"]
        if self.auth:
            if not self.tls:
                raise ValueError("SuperNode authentication needs TLS (tls=True)")
            cmd += ["--enable-supernode-auth"]
        conn = (f'root-certificates = "{self.certs["ca"]}"' if self.tls else "insecure = true")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n{conn}\n')
        self.superlink = self._spawn(cmd, "superlink.log")
        self._wait_port(self.port, proc=self.superlink, what="flower-superlink")
        if not self.simulation:
            for pid in self.partitions:
                self.add_node(pid)
        return self

    def add_node(self, partition: int, registered: bool = True) -> Node:
        """Start one SuperNode (and its ClientApp worker) for ``partition``; with auth, its key
        is registered with the SuperLink unless ``registered`` is False (an intruder: it gives
        up after 3 refused attempts)."""
        node = Node(partition, free_port(), registered=registered,
                    data_path=self.data_paths.get(partition))
        idx = len(self.nodes)
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--isolation",
               "process" if self.own_worker else "subprocess",
               "--host", "127.0.0.1", "--port", str(node.runtime_port)]
        cmd += ["--node-config", node_config_text(partition, node.data_path,
                                                   self.devices.get(partition),
                                                   self.dtypes.get(partition))]
        if self.tls:
            cmd += ["--root-certificates", str(self.certs["ca"])]
        else:
            cmd += ["--insecure"]
        if self.auth:
            node.key, pub = make_node_key(self.workdir / "keys", f"node{idx}")
            cmd += ["--auth-supernode-private-key", str(node.key)]
            if registered:
                res = self.flwr("supernode", "register", str(pub), CONNECTION)
                if res.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")
            else:
                cmd += ["--max-retries", "3", "--max-wait-time", "30"]
        node.supernode = self._spawn(cmd, f"supernode{idx}.log")
        self._wait_port(node.runtime_port, proc=node.supernode, what=f"supernode {idx}")
        if not self.own_worker:
            self.nodes.append(node)
            return node
        wcmd = [sys.executable, "-m", "fedtune.engines.flower.worker", "--runtime-api-address",
                f"127.0.0.1:{node.runtime_port}", "--parent-pid", str(node.supernode.pid)]
        if self.threads:
            wcmd += ["--threads", str(self.threads)]
        node.worker = self._spawn(wcmd, f"worker{idx}.log")
        self.nodes.append(node)
        return node

    def kill_node(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """Kill a SuperNode and its worker (as a machine that goes away would)."""
        for p in node.procs():
            _kill_group(p, sig)

    # --- runs ---------------------------------------------------------------------------------

    def submit(self, cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False,
               node_wait: float = 60.0) -> int:
        """``flwr run`` the experiment; returns the run id."""
        run_dir = Path(run_dir).resolve()
        app = write_app(self.workdir / "app", cfg, run_dir=str(run_dir), node_wait=node_wait)
        args = ["run", str(app), CONNECTION, "--format", "json",
                "--run-config", f"resume={'true' if resume else 'false'}"]
        if self.simulation:
            args += ["--federation-config", (f"num-supernodes={len(self.partitions)} "
                     f"client-resources-num-cpus={self.sim_cpus_per_client}")]
        res = self.flwr(*args)
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            payload = {}
        if res.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"flwr run failed ({res.returncode}): {res.stdout}{res.stderr}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> str:
        res = self.flwr("list", "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            data = json.loads(res.stdout[res.stdout.index("{"):])
            return str(data["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def wait(self, run_id: int, run_dir: str | Path, timeout: float = 900.0,
             poll: float = 1.0) -> list[dict]:
        """Wait until the run wrote its summary and flower.json (returns the metrics rows) or
        failed (raises with the ServerApp's error)."""
        run_dir = Path(run_dir)
        deadline = time.monotonic() + timeout
        last_status = time.monotonic()
        while time.monotonic() < deadline:
            raise_if_failed(run_dir)
            # the ServerApp writes flower.json last, after the summary and the export
            if (run_dir / "summary.json").is_file() and (run_dir / "flower.json").is_file():
                return [json.loads(x) for x in
                        (run_dir / "metrics.jsonl").read_text().splitlines()]
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited ({self.superlink.returncode})")
            if time.monotonic() - last_status > 30:  # a ServerApp that died before writing
                last_status = time.monotonic()
                st = self.status(run_id)
                if st.startswith("finished") and not (run_dir / "summary.json").is_file():
                    time.sleep(2)
                    if not (run_dir / "summary.json").is_file():
                        raise RuntimeError(f"run {run_id} ended ({st}) without a summary; "
                                           f"see flwr log {run_id}")
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")

    def run(self, cfg: ExperimentConfig, run_dir: str | Path, timeout: float = 900.0,
            **kw) -> list[dict]:
        return self.wait(self.submit(cfg, run_dir, **kw), run_dir, timeout)

    # --- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process started here and their descendants (the SuperLink's SuperExec
        and ServerApp run in sessions of their own, so they are found by parentage, by pid)."""
        import psutil

        procs: dict[int, psutil.Process] = {}
        for p in self._all:
            try:
                root = psutil.Process(p.pid)
                procs[p.pid] = root
                for c in root.children(recursive=True):
                    procs[c.pid] = c
            except psutil.NoSuchProcess:
                pass
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in self._all:  # reap
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> LocalFederation:  # noqa: PYI034
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    """Signal the process group of a process this module started (start_new_session=True makes
    its id the group id), so its children (superexec, serverapp) go too."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
