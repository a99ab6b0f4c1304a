"""The Flower engine: unit tests of its parts, then real SuperLink / SuperNode processes on
127.0.0.1 (free ports, every process stopped in a fixture teardown, pass or fail).

Equivalence. Ferret: the final model equals the in-process engine's bitwise. FedKSeed: it equals
bitwise an in-process run in which every client has its own client half (as every SuperNode
has), and the in-process engine's within 1e-5 absolute: there one client half is shared by all
simulated clients and it undoes each client's in-place zeroth-order steps in float32 before the
next client starts (``KSeedClient.sync``), so the next client trains from ``w0`` plus rounding
(~1e-7), which changes its scalars in the last digits. Measured: largest difference 7.7e-7
(largest weight change 4.8e-4), difference norm 0.02% of the update's norm; the test asserts
1e-5 and 1%.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.engines.flower import common
from fedtune.engines.flower.records import pack, unpack

from .conftest import BASE, TEST_DEVICE, tiny_overrides

pytest.importorskip("flwr")


def _cfg(data: Path, runs: Path, **extra):
    base = {"partition.num_clients": 3, "federation.clients_per_round": 1.0,
            "federation.round_timeout": 120, "method.name": "ferret",
            "eval.generate_examples": 2}
    base.update(extra)
    if base["method.name"] in ("ferret", "fedkseed", "fedkseed_pro"):  # FedAvg has no k
        base.setdefault("method.k", 64)
    return load_config(BASE, tiny_overrides(data, runs, **base))


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- parts ------------------------------------------------------------------------------------


def test_records_carry_the_bytes_unchanged():
    payload = bytes(range(256)) * 3 + b"\x00"
    back, meta = unpack(pack(payload, client=2, round=1, full=False, loss=0.25))
    assert back == payload and meta == {"client": 2, "round": 1, "full": False, "loss": 0.25}
    assert unpack(pack(None, partition=4)) == (None, {"partition": 4})
    assert unpack(pack(b"", x=1))[0] == b""


def test_run_config_round_trips_the_experiment(jsonl_data, tmp_path):
    cfg = _cfg(jsonl_data, tmp_path, **{"method.name": "ferret", "train.lr": 0.01})
    text = common.experiment_json(cfg)
    back, key = common.config_from_run({common.RUN_EXPERIMENT: text})
    assert common.experiment_json(back) == text and key == common.config_key(text)
    assert back.method_config() == cfg.method_config()
    # a SuperNode's own data path is applied on top
    local, key2 = common.config_from_run({common.RUN_EXPERIMENT: text},
                                         [f"data.path={jsonl_data}", "train.lr=0.5"])
    assert local.train.lr == 0.5 and key2 != key


def test_app_folder_is_a_valid_flower_app(jsonl_data, tmp_path):
    from flwr.cli.config_utils import load_and_validate

    cfg = _cfg(jsonl_data, tmp_path)
    app = common.write_app(tmp_path / "app", cfg, run_dir="/tmp/x", node_wait=5)
    conf, _warnings = load_and_validate(app / "pyproject.toml")
    flwr_app = conf["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": common.APP_REF_SERVER,
                                      "clientapp": common.APP_REF_CLIENT}
    assert json.loads(flwr_app["config"]["experiment"]) == json.loads(
        common.experiment_json(cfg))
    assert flwr_app["config"]["run-dir"] == "/tmp/x" and flwr_app["config"]["resume"] is False
    # the same folder from the command line
    from fedtune.cli import main

    items = tiny_overrides(jsonl_data, tmp_path, **{"method.name": "ferret"})
    assert main(["flower", "app", str(tmp_path / "app2"), str(BASE), *items,
                 "--out", "/tmp/x"]) == 0
    conf2, _ = load_and_validate(tmp_path / "app2" / "pyproject.toml")
    back, _ = common.config_from_run(conf2["tool"]["flwr"]["app"]["config"])
    assert back.method.name == "ferret" and back.partition.num_clients == 4


def test_supernode_with_its_own_data_file(jsonl_data, tmp_path):
    """``data-path`` in the node config: the client trains on every example of its own file."""
    from flwr.app import Context, RecordDict

    from fedtune.engines.flower import clientapp

    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps({"instruction": "Say it.", "input": f"w{i}",
                                       "output": f"w{i}"}) + "\n" for i in range(7)))
    cfg = _cfg(jsonl_data, tmp_path)
    ctx = Context(run_id=3, node_id=9, node_config={common.NODE_PARTITION: 5,
                                                    common.NODE_DATA_PATH: str(own)},
                  state=RecordDict(), run_config={common.RUN_EXPERIMENT: common.experiment_json(cfg)})
    clientapp._HALF.clear()
    try:
        half = clientapp.client_half(ctx)
        assert half.cid == 5 and len(half.exp.clients[5]) == 7
        assert half.exp.cfg.data.path == str(own)
        assert clientapp.client_half(ctx) is half  # kept across messages
    finally:
        clientapp._HALF.clear()


class FakeGrid:
    """A Grid whose SuperNodes are ClientApp calls in this process, one client half each (the
    ClientApp's per-process half is swapped in and out around each call). ``dead`` nodes never
    answer; ``restart(node)`` forgets a node's half, as a restarted SuperNode would."""

    def __init__(self, cfg, partitions: list[int], node_configs: dict[int, dict] | None = None):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        # Messages are stamped with the identity of the process's task (set by Flower's runtime)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
        text = common.experiment_json(cfg)
        extra = node_configs or {}
        self.ctx = {100 + i: Context(run_id=7, node_id=100 + i,
                                     node_config={common.NODE_PARTITION: p, **extra.get(p, {})},
                                     state=RecordDict(),
                                     run_config={common.RUN_EXPERIMENT: text})
                    for i, p in enumerate(partitions)}
        self.halves: dict[int, dict] = {n: {} for n in self.ctx}  # node -> its process's halves
        self.dead: set[int] = set()
        self.mute: dict[int, int] = {}  # node -> how many of its next messages go unanswered
        self.replies: dict[str, object] = {}
        self.sent: list[tuple[int, str, str]] = []  # (node, type, group)

    def restart(self, node: int) -> None:
        self.halves[node] = {}

    def get_node_ids(self):
        return list(self.ctx)

    def push_messages(self, messages):
        from fedtune.engines.flower import clientapp

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            ids.append(m.metadata.message_id)
            node = m.metadata.dst_node_id
            self.sent.append((node, m.metadata.message_type, m.metadata.group_id))
            if node in self.dead:
                continue
            if self.mute.get(node, 0) > 0:
                self.mute[node] -= 1
                continue
            clientapp._HALF.clear()
            clientapp._HALF.update(self.halves[node])
            self.replies[m.metadata.message_id] = clientapp.app(message=m, context=self.ctx[node])
            self.halves[node] = dict(clientapp._HALF)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_node_slow_on_its_first_answer_is_asked_again_within_node_wait(jsonl_data, tmp_path):
    """Node 101 does not answer its first handshake in time (as a ClientApp still building its
    experiment on a loaded machine): within node_wait it is asked again and found; with
    node_wait 0 it is left out and not asked again by the next round's discover."""
    from fedtune import experiment as ex
    from fedtune.engines.flower import serverapp
    from fedtune.engines.rounds import Progress

    cfg = _cfg(jsonl_data, tmp_path, **{"federation.round_timeout": 1, "eval.generate": False})
    exp = ex.setup(cfg, client_ids=[])
    server = ex.build_server(exp, ex.build_model(exp))
    for wait, found, asks in ((30.0, {0: 100, 1: 101, 2: 102}, 2), (0.0, {0: 100, 2: 102}, 1)):
        grid = FakeGrid(cfg, [0, 1, 2])
        grid.mute = {101: 1}
        transport = serverapp.FlowerTransport(grid, exp, server, Progress(False), node_wait=wait)
        transport.discover()
        assert transport.node_of == found, wait
        assert [g for n, _, g in grid.sent if n == 101] == ["handshake"] * asks, wait


@pytest.mark.slow
def test_transport_drops_silent_nodes_and_resyncs_restarted_ones(jsonl_data, tmp_path):
    """In-process Grid: client 1 is silent in round 2 (dropped, reported), client 2's node is
    restarted before round 3 (its fresh half cannot apply Ferret's round-2 record, answers
    resync, gets the full download). The final model equals a run with own halves in which
    client 1 sat out round 2."""
    from fedtune import experiment as ex
    from fedtune.engines.flower import serverapp
    from fedtune.engines.rounds import Progress, federate

    from .flower_support import PerClientTransport

    cfg = _cfg(jsonl_data, tmp_path, **{"federation.rounds": 3, "federation.round_timeout": 1,
                                        "federation.min_clients": 2, "eval.generate": False})
    grid = FakeGrid(cfg, [0, 1, 2])

    class Faults(serverapp.FlowerTransport):
        def fit_round(self, round_, downloads):
            grid.dead = {101} if round_ == 1 else set()
            if round_ == 2:
                grid.restart(102)
            return super().fit_round(round_, downloads)

    exp = ex.setup(cfg, client_ids=[])
    server = ex.build_server(exp, ex.build_model(exp))
    evaluator = ex.build_client(exp, ex.build_model(exp))
    transport = Faults(grid, exp, server, Progress(False), node_wait=0)
    assert transport.node_of == {0: 100, 1: 101, 2: 102}
    rows = federate(exp, server, evaluator, transport, tmp_path / "fake", out=Progress(False))
    assert [(r["clients"], r["dropped"]) for r in rows[1:]] == [
        ([0, 1, 2], []), ([0, 2], [1]), ([0, 1, 2], [])]
    assert [info["resync"] for info in transport.stats.rounds] == [[], [], [2]]
    assert sum(1 for n, t, g in grid.sent if n == 102 and g == "2") == 2  # asked twice

    class Sat(PerClientTransport):
        def fit_round(self, round_, downloads):
            return super().fit_round(round_, {c: d for c, d in downloads.items()
                                              if not (round_ == 1 and c == 1)})

    ref_exp = ex.setup(cfg)
    ref_server = ex.build_server(ref_exp, ex.build_model(ref_exp))
    ref_eval = ex.build_client(ref_exp, ex.build_model(ref_exp))
    federate(ref_exp, ref_server, ref_eval, Sat(ref_exp), tmp_path / "ref", out=Progress(False))
    got, ref = _model(tmp_path / "fake"), _model(tmp_path / "ref")
    assert all(torch.equal(got[k], ref[k]) for k in got)


@pytest.mark.slow
def test_too_few_answers_stop_the_run_then_resume_ends_as_uninterrupted(jsonl_data, tmp_path):
    """Client 2's node is silent in round 2 and federation.min_clients = 3: the run stops with
    round 1's checkpoint. Resumed as a new Flower run (fresh client halves everywhere), it ends
    with the model of an uninterrupted run."""
    from fedtune import experiment as ex
    from fedtune.engines.flower import serverapp
    from fedtune.engines.rounds import Progress, federate

    from .flower_support import per_client_run

    cfg = _cfg(jsonl_data, tmp_path, **{"federation.round_timeout": 0.5,
                                        "federation.min_clients": 3, "eval.generate": False})

    def attempt(grid, resume):
        exp = ex.setup(cfg, client_ids=[])
        server = ex.build_server(exp, ex.build_model(exp))
        evaluator = ex.build_client(exp, ex.build_model(exp))
        transport = serverapp.FlowerTransport(grid, exp, server, Progress(False), node_wait=0)
        orig = transport.fit_round

        def fit_round(round_, downloads):
            grid.dead = {102} if round_ == 1 and not resume else set()
            return orig(round_, downloads)

        transport.fit_round = fit_round
        return federate(exp, server, evaluator, transport, tmp_path / "run", resume=resume,
                        out=Progress(False)), transport

    with pytest.raises(RuntimeError, match="only 2 of 3 clients answered"):
        attempt(FakeGrid(cfg, [0, 1, 2]), resume=False)
    assert [r["round"] for r in _rows(tmp_path / "run")] == [0, 1]
    rows, _ = attempt(FakeGrid(cfg, [0, 1, 2]), resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["clients"] == [0, 1, 2]
    per_client_run(cfg, tmp_path / "ref")
    got, ref = _model(tmp_path / "run"), _model(tmp_path / "ref")
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_node_config_sets_this_nodes_device_and_dtype(jsonl_data, tmp_path):
    text = common.node_config_text(2, "/d/x.jsonl", "cuda:1", "bfloat16")
    assert text == 'partition-id=2 data-path="/d/x.jsonl" device="cuda:1" dtype="bfloat16"'
    assert common.node_config_text(0) == "partition-id=0"
    node = {common.NODE_PARTITION: 2, common.NODE_DEVICE: "cpu", common.NODE_DTYPE: "bfloat16"}
    cfg = _cfg(jsonl_data, tmp_path)
    local, _ = common.config_from_run({common.RUN_EXPERIMENT: common.experiment_json(cfg)},
                                      common.node_overrides(node))
    assert (local.model.device, local.model.dtype) == ("cpu", "bfloat16")
    assert (cfg.model.device, cfg.model.dtype) == (TEST_DEVICE, "float32")  # the server's


@pytest.mark.parametrize("args, message", [
    (["supernode", "--superlink", "127.0.0.1:1", "--partition", "0", "--device", "gpu"],
     "--device: 'gpu' is not a device"),
    (["local", "--node-device", "0=tpu"], "--node-device 0=tpu: 'tpu' is not a device"),
    (["local", "--node-dtype", "x=bfloat16"], "use PARTITION=VALUE"),
    (["local", "--node-dtype", "1=float64"], "'float64' is not a dtype"),
])
def test_flower_cli_refuses_a_bad_device_or_dtype_before_starting_anything(args, message,
                                                                           capsys):
    from fedtune.cli import main

    assert main(["flower", *args]) == 2
    assert message in capsys.readouterr().err


def _mixed_reference(cfg, dtypes: dict[int, str], run_dir: Path):
    """In process, every client with its own half, client c's model in ``dtypes[c]``."""
    import dataclasses

    from fedtune import experiment as ex

    from .flower_support import PerClientTransport, per_client_run

    class Mixed(PerClientTransport):
        def fit_round(self, round_, downloads):
            for cid, dtype in dtypes.items():
                if cid not in self.halves:
                    own = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                             dtype=dtype))
                    e = dataclasses.replace(self.exp, cfg=own)
                    self.halves[cid] = ex.build_client(e, ex.build_model(e))
            return super().fit_round(round_, downloads)

    return per_client_run(cfg, run_dir, transport=Mixed)


def _fedavg_pair_cfg(data: Path, runs: Path):
    return load_config(BASE, tiny_overrides(data, runs, **{
        "partition.num_clients": 2, "eval.generate": False, "federation.clients_per_round": 1.0,
        "federation.round_timeout": 120}))


def test_mixed_dtype_pair_for_fedavg(jsonl_data, tmp_path):
    """A float32 ServerApp, SuperNode 0 in bfloat16 (its node config), SuperNode 1 in float32,
    FedAvg on the float32 wire: both answer every round, node 0's model is bfloat16, and the
    final global model equals bitwise an in-process run whose client 0 is bfloat16."""
    from fedtune import experiment as ex
    from fedtune.engines.flower import serverapp
    from fedtune.engines.rounds import Progress, federate

    cfg = _fedavg_pair_cfg(jsonl_data, tmp_path)
    grid = FakeGrid(cfg, [0, 1], {0: {common.NODE_DTYPE: "bfloat16"}})
    exp = ex.setup(cfg, client_ids=[])
    server = ex.build_server(exp, ex.build_model(exp))
    evaluator = ex.build_client(exp, ex.build_model(exp))
    transport = serverapp.FlowerTransport(grid, exp, server, Progress(False), node_wait=0)
    rows = federate(exp, server, evaluator, transport, tmp_path / "fake", out=Progress(False))
    assert [(r["clients"], r["dropped"]) for r in rows[1:]] == [([0, 1], []), ([0, 1], [])]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    (half0,) = grid.halves[100].values()
    (half1,) = grid.halves[101].values()
    assert {p.dtype for p in half0.client.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half1.client.model.parameters()} == {torch.float32}
    assert {p.dtype for p in evaluator.model.parameters()} == {torch.float32}
    _mixed_reference(cfg, {0: "bfloat16"}, tmp_path / "ref")
    got, ref = _model(tmp_path / "fake"), _model(tmp_path / "ref")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)


# --- real processes ---------------------------------------------------------------------------


@pytest.fixture
def federation(tmp_path):
    """Yields a factory; every federation it made is stopped at teardown."""
    from fedtune.engines.flower.launch import LocalFederation

    made = []

    def make(partitions, **kw):
        fed = LocalFederation(tmp_path / f"fed{len(made)}", partitions, **kw)
        made.append(fed)
        return fed.start()

    yield make
    for fed in made:
        fed.stop()
    for fed in made:  # nothing left running
        for p in fed._all:
            assert p.poll() is not None


@pytest.mark.slow
def test_same_final_model_and_bytes_as_in_process(jsonl_data, tmp_path, federation):
    from fedtune.engines.inprocess import run

    from .flower_support import per_client_run

    fed = federation([0, 1, 2])
    for method in ("ferret", "fedkseed"):
        cfg = _cfg(jsonl_data, tmp_path, **{"method.name": method})
        flower_dir = tmp_path / method / "flower"
        rows = fed.run(cfg, flower_dir, timeout=600)
        ref_rows = run(cfg, tmp_path / method / "inprocess", progress=False)
        got, ref = _model(flower_dir), _model(tmp_path / method / "inprocess")
        assert got.keys() == ref.keys()
        if method == "ferret":
            assert all(torch.equal(got[k], ref[k]) for k in got), method
        else:
            per_client_run(cfg, tmp_path / method / "per-client")
            own = _model(tmp_path / method / "per-client")
            assert all(torch.equal(got[k], own[k]) for k in got), method
            w0 = torch.cat([p.flatten() for p in _model_w0(cfg).values()])
            g = torch.cat([got[k].flatten() for k in got])
            r = torch.cat([ref[k].flatten() for k in got])
            gap, update = (g - r).abs().max().item(), (r - w0).norm().item()
            assert gap < 1e-5 and (g - r).norm().item() < 0.01 * update, (gap, update)
        # 3 clients in both rounds; the bytes each carried are the encoded message lengths
        assert [r["round"] for r in rows] == [0, 1, 2]
        for got_row, ref_row in zip(rows[1:], ref_rows[1:]):
            assert got_row["clients"] == [0, 1, 2] and got_row["dropped"] == []
            for key in ("bytes_up_total", "bytes_down_total", "bytes_up_per_client"):
                assert got_row[key] == ref_row[key], key
        flower = json.loads((flower_dir / "flower.json").read_text())
        assert sorted(flower["nodes"]) == ["0", "1", "2"]
        for info, row in zip(flower["rounds"], rows[1:]):
            # Flower's serialised messages carry the fedtune bytes plus a bounded overhead
            assert row["bytes_down_total"] < info["flower_down_bytes"]
            assert row["bytes_up_total"] < info["flower_up_bytes"]
            assert info["flower_up_bytes"] - row["bytes_up_total"] < 3 * 2048


def _model_w0(cfg):
    from fedtune import experiment as ex
    from fedtune.methods.base import trainable_state

    exp = ex.setup(cfg, client_ids=[])
    return trainable_state(ex.build_model(exp))


@pytest.mark.slow
def test_tls_and_supernode_authentication(jsonl_data, tmp_path, federation):
    fed = federation([0, 1, 2], tls=True, auth=True)
    # TLS: the SuperLink presents a certificate for 127.0.0.1 signed by the test CA
    ctx = ssl.create_default_context(cafile=str(fed.certs["ca"]))
    with (socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw,
          ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    intruder = fed.add_node(1, registered=False)  # a key the SuperLink does not know
    cfg = _cfg(jsonl_data, tmp_path, **{"method.name": "fedkseed"})
    rows = fed.run(cfg, tmp_path / "secure", timeout=600)
    assert [r["clients"] for r in rows[1:]] == [[0, 1, 2], [0, 1, 2]]
    assert intruder.supernode.wait(timeout=120) != 0
    log = (fed.logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in log
    listed = fed.flwr("supernode", "list", "fedtune-local", "--format", "json")
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    assert len([n for n in nodes if n["status"] == "online"]) == 3


@pytest.mark.slow
def test_supernode_killed_mid_round(jsonl_data, tmp_path, federation):
    """Client 2's SuperNode is SIGKILLed while it trains in round 2: the round completes with
    clients 0 and 1 when the round timeout expires, client 2 is reported dropped, the run
    finishes, and its final model equals an in-process run (own halves) in which client 2 sat
    out round 2: nothing else was lost. (Rejoining after a restart: the FakeGrid test.)"""
    from fedtune import experiment as ex
    from fedtune.engines.rounds import Progress, federate

    from .flower_support import PerClientTransport, until_logged

    fed = federation([0, 1, 2])
    # round_timeout 45: on a loaded 2-core CI machine a worker's first round (building its half,
    # 10 local steps) took over 15 s, so client 0 was dropped from round 1 too
    cfg = _cfg(jsonl_data, tmp_path, **{
        "method.name": "ferret", "federation.min_clients": 2, "federation.round_timeout": 45,
        "train.local_steps": 10})
    run_dir = tmp_path / "killed"
    run_id = fed.submit(cfg, run_dir)
    victim = fed.nodes[2]
    log = fed.logs / "supernode2.log"
    until_logged(log, f"[RUN {run_id}, ROUND 1]", run_dir)  # round 2's message arrived
    fed.kill_node(victim, signal.SIGKILL)
    victim.supernode.wait(timeout=30)
    assert not re.search(r"ROUND 1\]\s*\n.*Sending: train", log.read_text())  # no answer sent
    rows = fed.wait(run_id, run_dir, timeout=600)
    assert [(r["clients"], r["dropped"]) for r in rows[1:]] == [([0, 1, 2], []), ([0, 1], [2])]
    flower = json.loads((run_dir / "flower.json").read_text())
    assert "no answer" in flower["rounds"][1]["failed"]["2"]

    class SitOut(PerClientTransport):
        def fit_round(self, round_, downloads):
            return super().fit_round(round_, {c: d for c, d in downloads.items()
                                              if not (round_ == 1 and c == 2)})

    exp = ex.setup(cfg)
    server = ex.build_server(exp, ex.build_model(exp))
    evaluator = ex.build_client(exp, ex.build_model(exp))
    federate(exp, server, evaluator, SitOut(exp), tmp_path / "ref", out=Progress(False))
    got, ref = _model(run_dir), _model(tmp_path / "ref")
    assert all(torch.equal(got[k], ref[k]) for k in got)


@pytest.mark.slow
def test_simulation_engine_runs_the_same_apps(jsonl_data, tmp_path, federation):
    """Flower's Simulation Engine (Ray) runs the same ServerApp and ClientApp with virtual
    SuperNodes. Ray runs each client with one torch thread, so the reference is the own-halves
    in-process run on one thread: bitwise equal. Skipped where flwr[simulation] is absent."""
    pytest.importorskip("ray")
    from .flower_support import per_client_run

    fed = federation([0, 1, 2], simulation=True)
    cfg = _cfg(jsonl_data, tmp_path, **{"method.name": "fedkseed"})
    rows = fed.run(cfg, tmp_path / "sim", timeout=600)
    assert [r["clients"] for r in rows[1:]] == [[0, 1, 2], [0, 1, 2]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_client_run(cfg, tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    got, ref = _model(tmp_path / "sim"), _model(tmp_path / "ref")
    assert all(torch.equal(got[k], ref[k]) for k in got)


@pytest.mark.slow
def test_mixed_dtype_pair_in_two_processes(jsonl_data, tmp_path, federation):
    """The same pair as real SuperNodes (``LocalFederation(dtypes=...)``, what
    ``fedtune flower local --node-dtype 0=bfloat16`` starts): the same final model."""
    cfg = _fedavg_pair_cfg(jsonl_data, tmp_path)
    fed = federation([0, 1], dtypes={0: "bfloat16"})
    rows = fed.run(cfg, tmp_path / "flower", timeout=600)
    assert [r["clients"] for r in rows[1:]] == [[0, 1], [0, 1]]
    _mixed_reference(cfg, {0: "bfloat16"}, tmp_path / "ref")
    got, ref = _model(tmp_path / "flower"), _model(tmp_path / "ref")
    assert all(torch.equal(got[k], ref[k]) for k in got)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_supernodes_in_one_federation(jsonl_data, tmp_path, federation):
    """SuperNode 0 on the GPU in bfloat16, SuperNode 1 and the ServerApp on the CPU in float32."""
    cfg = _fedavg_pair_cfg(jsonl_data, tmp_path)
    fed = federation([0, 1], devices={0: "cuda"}, dtypes={0: "bfloat16"})
    rows = fed.run(cfg, tmp_path / "flower", timeout=600)
    assert [r["clients"] for r in rows[1:]] == [[0, 1], [0, 1]]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
