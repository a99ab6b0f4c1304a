"""The ClientApp: the method's client half on a SuperNode.

A SuperNode is one fedtune client: ``--node-config 'partition-id=3'`` says which partition of the
experiment's data it trains on, or ``data-path="/data/mine.jsonl"`` gives it its own local
instruction data (Alpaca/Dolly JSONL; every example is training data, the server evaluates).
``device="cuda:1"`` and ``dtype="bfloat16"`` set this node's ``model.device`` and ``model.dtype``
(each party's own; the ServerApp uses the experiment's).

Methods assume a persistent client half (FedKSeed's and Ferret's downloads only carry what the
client is missing since the round it last synced), so the half and its model are kept in this
process across rounds, keyed by run and config. ``fedtune flower supernode`` runs the SuperNode
with a long-lived ClientApp process (``worker.py``) for that. Under Flower's default
``--isolation subprocess`` every message starts a new process, so the half is rebuilt each time
from ``w0``: when such a fresh half cannot apply an incremental download, it answers ``resync``
and the ServerApp sends it the full-state download (``since=None``) instead. The same path lets a
SuperNode that was restarted rejoin.

Local work is exactly the in-process engine's: ``rounds.fit_client`` (the same seed from
``experiment.client_seed(cfg, round, cid)``, the same context), so a client's upload matches the
in-process one for the same model state. A client whose training diverges answers with the
reason, and the ServerApp lists it under ``rejected``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from logging import INFO

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedtune import experiment as ex
from fedtune import wire
from fedtune.engines.flower import secagg
from fedtune.engines.flower.common import (
    NODE_DATA_PATH,
    NODE_PARTITION,
    config_from_run,
    node_overrides,
)
from fedtune.engines.flower.records import pack, unpack
from fedtune.engines.rounds import fit_client


@dataclass
class _Half:
    key: str
    exp: ex.Experiment
    client: object
    cid: int
    fresh: bool = True
    """No download applied yet in this process: the model is at ``w0``."""


_HALF: OrderedDict[str, _Half] = OrderedDict()
"""The client halves of this process, least recently used first: one on a SuperNode (replaced
when another run or config arrives); on the Simulation Engine one Ray actor serves many clients,
so ``FEDTUNE_FLOWER_HALVES`` (default 1) sets how many it keeps (each holds a model)."""


def _max_halves() -> int:
    return max(1, int(os.environ.get("FEDTUNE_FLOWER_HALVES", "1")))


def _local_experiment(cfg, cid: int, path: str) -> ex.Experiment:
    """The experiment with this client's own JSONL file as its data (no partitioning)."""
    from fedtune.data.jsonl import read_jsonl
    from fedtune.methods.registry import get_method
    from fedtune.models import load_tokenizer
    from fedtune.tasks import ClientData

    ex.seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, classifier=cfg.classifier)
    task = ex.make_task(cfg, tokenizer, None)
    clients = [ClientData([]) for _ in range(cid + 1)]
    clients[cid] = ClientData([task.encode(e) for e in read_jsonl(path)])
    spec = get_method(cfg.method.name)
    return ex.Experiment(cfg, tokenizer, task, clients, [], None, spec, cfg.method_config())


def client_half(context: Context) -> _Half:
    if NODE_PARTITION not in context.node_config:
        raise ValueError(f"this SuperNode has no {NODE_PARTITION!r} in its node config; start it "
                         f"with --node-config '{NODE_PARTITION}=N'")
    cid = int(context.node_config[NODE_PARTITION])
    path = str(context.node_config.get(NODE_DATA_PATH) or "")
    cfg, key = config_from_run(context.run_config, node_overrides(context.node_config))
    key = f"{context.run_id}/{key}/{cid}/{path}"
    if key in _HALF:
        _HALF.move_to_end(key)
        return _HALF[key]
    while len(_HALF) >= _max_halves():  # drop the oldest model before building the next
        _HALF.popitem(last=False)
    exp = _local_experiment(cfg, cid, path) if path else ex.setup(cfg, client_ids=[cid])
    if not len(exp.clients[cid]):
        raise ValueError(f"client {cid} has no training examples")
    model = ex.build_model(exp)
    half = _Half(key, exp, ex.build_client(exp, model), cid)
    _HALF[key] = half
    return half


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: which partition this node trains, and how much data it has (builds the half,
    so model loading is not part of the first round)."""
    t0 = time.perf_counter()
    half = client_half(context)
    return Message(pack(None, partition=half.cid, examples=len(half.exp.clients[half.cid]),
                        setup_s=time.perf_counter() - t0, pid=os.getpid()), reply_to=msg)


@app.train(mods=[secagg.secagg_mod])
def train(msg: Message, context: Context) -> Message:
    if secagg.is_secure(msg):
        return secure_train(msg, context)
    down, meta = unpack(msg.content)
    if down is None:
        raise ValueError("train message without a download")
    half = client_half(context)
    cid, r = int(meta["client"]), int(meta["round"])
    if cid != half.cid:
        raise ValueError(f"message for client {cid} reached the SuperNode of client {half.cid}")
    try:
        res = fit_client(half.exp, half.client, r, cid, down)
    except wire.MessageError as e:
        if half.fresh and not meta.get("full", False):
            # This process's half is at w0 but the download assumes a later round.
            return Message(pack(None, client=cid, round=r, resync=True, reason=str(e)),
                           reply_to=msg)
        raise
    half.fresh = False
    if res.error is not None:  # training diverged: the server lists it under rejected
        return Message(pack(None, client=cid, round=r, examples=res.num_examples,
                            received=len(down), error=res.error), reply_to=msg)
    return Message(pack(res.payload, client=cid, round=r, examples=res.num_examples,
                        loss=float(res.train_loss), received=len(down),
                        **{f"time_{k}": float(v) for k, v in res.timings.items()}),
                   reply_to=msg)


def secure_train(msg: Message, context: Context) -> Message:
    """Stage 2 of a SecAgg+ round (see ``secagg.py``): train on the full-state download, answer
    the weighted dense vector of the upload for the mod to mask. A client whose training
    diverges raises: the workflow drops it and unmasks without it."""
    from fedtune.methods import secure

    down, conf = secagg.fit_input(msg)
    half = client_half(context)
    cid, r = int(conf["client"]), int(conf["round"])
    if cid != half.cid:
        raise ValueError(f"message for client {cid} reached the SuperNode of client {half.cid}")
    log(INFO, "fedtune: SecAgg+ round %d: client %d trains (keys shared)", r + 1, cid)
    res = fit_client(half.exp, half.client, r, cid, down)
    half.fresh = False
    if res.error is not None:
        raise RuntimeError(f"client {cid}: {res.error}")
    with_t = time.perf_counter()
    vec = secure.client_vector(half.client, down, res.payload, r,
                               half.exp.cfg.train.local_steps)
    weighted = vec.masked(float(conf["weight"]))
    clipped = int((abs(weighted) > float(conf["clip"])).sum())
    timings = {**res.timings, "secure_encode": time.perf_counter() - with_t}
    return secagg.fit_reply(msg, weighted, {
        "client": cid, "round": r, "examples": res.num_examples, "loss": float(res.train_loss),
        "received": len(down), "upload": len(res.payload), "digest": vec.digest,
        "clipped": clipped, **{f"time_{k}": float(v) for k, v in timings.items()}})
