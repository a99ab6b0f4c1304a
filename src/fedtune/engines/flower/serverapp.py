"""The ServerApp: the method's server half and the shared round loop
(:func:`fedtune.engines.rounds.federate`), with the clients reached through Flower's Grid.

At the start the ServerApp asks every connected SuperNode which partition it trains (a ``query``
message; the ClientApp answers from its node config and builds its half). Each round the loop
samples clients and builds their downloads exactly as in-process; :class:`FlowerTransport` sends
each sampled client its download as bytes in a ``train`` message, waits at most
``federation.round_timeout`` seconds, and returns the uploads of those that answered. A client
with no SuperNode, one that failed, or one that did not answer in time is dropped from the round
(listed under ``dropped`` in the metrics); the loop stops if fewer than
``federation.min_clients`` answered, keeping the last round's checkpoint.

The run folder is the in-process engine's (config.yaml, metrics.jsonl, checkpoint.pt,
summary.json, model.safetensors), plus ``flower.json`` (which node served which client, Flower
message sizes) and ``error.txt`` if the run stopped on an error.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedtune import experiment as ex
from fedtune.engines.flower.common import (
    RUN_DIR,
    RUN_NODE_WAIT,
    RUN_RESUME,
    config_from_run,
)
from fedtune.engines.flower.records import pack, unpack
from fedtune.engines.rounds import (
    ClientResult,
    Progress,
    SecureSum,
    default_run_dir,
    federate,
)


def flower_message_bytes(msg: Message) -> int:
    """Size of a message's content as Flower serialises it (the objects it pushes: records,
    arrays, array chunks), i.e. the bytes on the wire before HTTP and TLS framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


@dataclass
class Stats:
    """What the Flower layer adds, per round (written to flower.json)."""

    rounds: list[dict] = field(default_factory=list)
    nodes: dict[int, int] = field(default_factory=dict)


POLL_S = 0.1
"""How often the ServerApp pulls replies (Flower's ``send_and_receive`` waits 3 s between pulls,
which would add up to 3 s to every round)."""


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive`` with a short pull interval: push, then pull the replies until
    all arrived or ``timeout`` seconds passed."""
    ids = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while ids:
        got = list(grid.pull_messages(ids))
        replies.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if not ids or time.monotonic() >= end:
            break
        time.sleep(POLL_S)
    return replies


class FlowerTransport:
    """Delivers downloads to the SuperNodes that serve the sampled clients."""

    def __init__(self, grid: Grid, exp: ex.Experiment, server, out: Progress,
                 node_wait: float = 60.0):
        self.grid, self.exp, self.server, self.out = grid, exp, server, out
        self.cfg = exp.cfg
        self.node_of: dict[int, int] = {}  # client (partition) -> Flower node id
        self.asked: set[int] = set()  # node ids already asked for their partition
        self.live: set[int] = set()  # node ids the SuperLink lists as connected
        self.silent: set[int] = set()  # nodes that did not answer in the last round
        self.examples: dict[int, int] = {}  # client -> its example count (handshake)
        self.sums: dict[int, SecureSum] = {}  # round -> its secure sum (secure aggregation)
        self.stats = Stats()
        self.discover(wait=node_wait)

    # --- which node serves which client -------------------------------------------------------

    def _ask(self, node_ids: Iterable[int], timeout: float) -> set[int]:
        """Ask ``node_ids`` for their partition; returns the nodes that answered in time."""
        msgs = [Message(pack(None), dst_node_id=n, message_type=MessageType.QUERY,
                        group_id="handshake") for n in node_ids]
        if not msgs:
            return set()
        self.asked.update(node_ids)  # asked once, but see discover for slow first answers
        answered = set()
        for reply in exchange(self.grid, msgs, timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self.out.line(f"flower: node {node} failed the handshake: "
                              f"{reply.error.reason}")
                continue
            _, meta = unpack(reply.content)
            cid = int(meta["partition"])
            if not 0 <= cid < len(self.exp.clients):
                self.out.line(f"flower: node {node} says it is client {cid}; the experiment has "
                              f"{len(self.exp.clients)} clients: ignored")
            elif cid in self.node_of and self.node_of[cid] != node and (
                    self.node_of[cid] in self.live and self.node_of[cid] not in self.silent):
                self.out.line(f"flower: node {node} also says it is client {cid} (node "
                              f"{self.node_of[cid]} was first): ignored")
            else:
                if cid in self.node_of and self.node_of[cid] != node:
                    self.out.line(f"flower: client {cid} moved from node {self.node_of[cid]} "
                                  f"(gone) to node {node}")
                self.node_of[cid] = node
                self.examples[cid] = int(meta.get("examples", 0))
        return answered

    def discover(self, wait: float = 0.0) -> None:
        """Ask nodes not asked yet for their partition; with ``wait``, keep asking until every
        client has a node or ``wait`` seconds have passed. Within ``wait``, a node that did not
        answer in time is asked again (its first answer can take long: the ClientApp builds
        its experiment first, which on a loaded machine took over 15 s); after it, a node
        that hangs is not re-asked, so it cannot cost every round a timeout."""
        deadline = time.monotonic() + wait
        n = len(self.exp.clients)
        while True:
            self.live = set(self.grid.get_node_ids())
            new = [x for x in self.live if x not in self.asked]
            answered = self._ask(new, timeout=max(self.cfg.federation.round_timeout, 5.0))
            if time.monotonic() < deadline:
                self.asked -= set(new) - answered
            if len(self.node_of) >= n or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if self.stats.nodes == self.node_of:
            return
        self.stats.nodes = dict(self.node_of)
        missing = sorted(set(range(n)) - set(self.node_of))
        self.out.line(f"flower: {len(self.node_of)} of {n} clients have a SuperNode"
                      + (f"; no node for {missing}" if missing else ""))

    # --- a round ------------------------------------------------------------------------------

    def _send(self, round_: int, downloads: dict[int, bytes], full: bool, timeout: float,
              info: dict) -> dict[int, Message]:
        msgs = {}
        for cid, down in downloads.items():
            msgs[cid] = Message(pack(down, client=cid, round=round_, full=full),
                                dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN,
                                group_id=str(round_))
            info["flower_down_bytes"] += flower_message_bytes(msgs[cid])
        by_node = {self.node_of[cid]: cid for cid in msgs}
        replies = {}
        for reply in exchange(self.grid, list(msgs.values()), timeout):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is not None:
                replies[cid] = reply
        return replies

    def fit_round(self, round_: int, downloads: dict[int, bytes]) -> list[ClientResult]:
        self.discover()
        if self.cfg.federation.secure_aggregation:
            return self._secure_round(round_, downloads)
        t0 = time.perf_counter()
        info = {"round": round_ + 1, "flower_down_bytes": 0, "flower_up_bytes": 0,
                "resync": [], "failed": {}}
        reachable = {cid: d for cid, d in downloads.items() if cid in self.node_of}
        for cid in sorted(set(downloads) - set(reachable)):
            info["failed"][cid] = "no SuperNode"
        replies = self._send(round_, reachable, False, self.cfg.federation.round_timeout, info)
        # Clients whose process lost its model (restarted, or a new process per message) ask
        # for the full-state download instead of the incremental one.
        resync = {}
        for cid, reply in list(replies.items()):
            if not reply.has_error() and unpack(reply.content)[1].get("resync"):
                resync[cid] = self.server.download(round_, since=None)
                del replies[cid]
        if resync:  # a second exchange, with a round timeout of its own
            info["resync"] = sorted(resync)
            replies.update(self._send(round_, resync, True, self.cfg.federation.round_timeout,
                                      info))
        results = []
        for cid in sorted(reachable):
            reply = replies.get(cid)
            if reply is None:
                info["failed"][cid] = "no answer before federation.round_timeout"
                continue
            if reply.has_error():
                info["failed"][cid] = f"error: {reply.error.reason}"
                continue
            info["flower_up_bytes"] += flower_message_bytes(reply)
            payload, meta = unpack(reply.content)
            sent = len(resync.get(cid, reachable[cid]))
            if payload is None and meta.get("error"):  # its training diverged
                results.append(ClientResult(cid, int(meta["examples"]), b"", sent,
                                            float("nan"), error=str(meta["error"])))
                continue
            if payload is None or int(meta["round"]) != round_ or int(meta["received"]) != sent:
                info["failed"][cid] = "malformed reply"
                continue
            timings = {k[len("time_"):]: float(v) for k, v in meta.items()
                       if k.startswith("time_")}
            results.append(ClientResult(cid, int(meta["examples"]), payload, int(meta["received"]),
                                        float(meta["loss"]), timings))
            self.out.line(f"round {round_ + 1}/{self.cfg.federation.rounds}  client {cid} (node "
                          f"{self.node_of[cid]})  train loss {float(meta['loss']):.4f}  up "
                          f"{len(payload):,} B  down {sent:,} B")
        self.silent = {self.node_of[cid] for cid in reachable if cid not in replies}
        for cid, why in info["failed"].items():
            self.out.line(f"round {round_ + 1}: client {cid} dropped ({why})")
        info["time_network_round"] = time.perf_counter() - t0
        info["failed"] = {str(k): v for k, v in info["failed"].items()}
        self.stats.rounds.append(info)
        return results

    # --- a round under secure aggregation ------------------------------------------------------

    def _secure_round(self, round_: int, downloads: dict[int, bytes]) -> list[ClientResult]:
        """The round through Flower's SecAgg+ (``secagg.py``): every client gets the full-state
        download and its weight; what comes back is the sum of the weighted vectors."""
        from fedtune.engines.flower import secagg
        from fedtune.methods import secure

        f = self.cfg.federation
        t0 = time.perf_counter()
        info = {"round": round_ + 1, "secure_aggregation": True, "flower_down_bytes": 0,
                "flower_up_bytes": 0, "resync": [], "failed": {}, "clipped": 0}
        reachable = sorted(cid for cid in downloads if cid in self.node_of)
        for cid in sorted(set(downloads) - set(reachable)):
            info["failed"][cid] = "no SuperNode"
        n_ex = {cid: self.examples.get(cid, 0) for cid in reachable}
        total_ex = sum(n_ex.values())
        weight = {cid: (n_ex[cid] / total_ex if f.weighting == "examples" and total_ex > 0
                        else 1.0 / len(reachable)) for cid in reachable}
        down = self.server.download(round_, since=None) if reachable else b""
        configs = {self.node_of[cid]: {"client": cid, "round": round_,
                                       "weight": weight[cid],
                                       "clip": float(f.secagg_clipping_range)}
                   for cid in reachable}
        cid_of = {self.node_of[cid]: cid for cid in reachable}
        outcome = (secagg.secure_round(self.grid, exchange, flower_message_bytes, f, round_,
                                       down, configs)
                   if len(reachable) >= 2 else secagg.Outcome())
        if len(reachable) < 2:
            for cid in reachable:
                info["failed"][cid] = "SecAgg+ needs at least 2 clients in a round"
        for node, why in outcome.failed.items():
            if node in cid_of:
                info["failed"][cid_of[node]] = why
        info["flower_down_bytes"] = outcome.down_bytes
        info["flower_up_bytes"] = sum(outcome.up_bytes.values())
        results = []
        if outcome.total is not None:
            for node, meta in sorted(outcome.metrics.items(), key=lambda x: cid_of[x[0]]):
                cid = cid_of[node]
                info["failed"].pop(cid, None)
                info["clipped"] += int(meta["clipped"])
                timings = {k[len("time_"):]: float(v) for k, v in meta.items()
                           if k.startswith("time_")}
                results.append(ClientResult(cid, int(meta["examples"]), b"", len(down),
                                            float(meta["loss"]), timings,
                                            upload_bytes=outcome.up_bytes.get(node, 0)))
                self.out.line(f"round {round_ + 1}/{f.rounds}  client {cid} (node {node})  "
                              f"train loss {float(meta['loss']):.4f}  secure upload "
                              f"{outcome.up_bytes.get(node, 0):,} B  down {len(down):,} B")
            clients = [res.client_id for res in results]
            weight_sum = sum(weight[c] for c in clients)
            aggregate = secure.split(self.server, outcome.total, weight_sum,
                                     self.cfg.train.local_steps)
            self.sums[round_] = SecureSum(aggregate, clients, [
                str(outcome.metrics[self.node_of[c]]["digest"]) for c in clients])
            if info["clipped"]:
                self.out.line(f"round {round_ + 1}: {info['clipped']} coordinates were clipped "
                              f"to +-federation.secagg_clipping_range")
        self.silent = {self.node_of[cid] for cid in reachable
                       if str(info["failed"].get(cid, "")).startswith("no answer")}
        for cid, why in info["failed"].items():
            self.out.line(f"round {round_ + 1}: client {cid} dropped ({why})")
        info["time_network_round"] = time.perf_counter() - t0
        info["failed"] = {str(k): v for k, v in info["failed"].items()}
        self.stats.rounds.append(info)
        return results

    def secure_sum(self, round_: int) -> SecureSum | None:
        """The round's secure sum for the round loop (None: not a secure round)."""
        return self.sums.pop(round_, None)


def run_server(grid: Grid, context: Context) -> list[dict]:
    cfg, _ = config_from_run(context.run_config)
    run_dir = Path(str(context.run_config.get(RUN_DIR) or "") or default_run_dir(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(context.run_config.get(RUN_RESUME, False))
    (run_dir / "error.txt").unlink(missing_ok=True)
    (run_dir / "flower.json").unlink(missing_ok=True)  # written when this attempt ends
    out = Progress(True)
    try:
        exp = ex.setup(cfg, client_ids=[])  # the server needs the held-out data only
        model = ex.build_model(exp)
        server = ex.build_server(exp, model)
        evaluator = ex.build_client(exp, model)  # federate syncs it from its own round
        transport = FlowerTransport(grid, exp, server, out,
                                    node_wait=float(context.run_config.get(RUN_NODE_WAIT, 60.0)))
        try:
            rows = federate(exp, server, evaluator, transport, run_dir, resume=resume, out=out)
        finally:
            (run_dir / "flower.json").write_text(json.dumps(
                {"nodes": {str(k): v for k, v in transport.stats.nodes.items()},
                 "rounds": transport.stats.rounds}, indent=1))
    except BaseException:
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    return rows


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
