"""What Flower's network layer adds: per-round wall time, bytes and memory for 3, 10 and 20
SuperNodes on this machine (a SuperLink, N SuperNodes each with its fedtune ClientApp worker, all
on 127.0.0.1), beside the in-process engine on the same experiment (tiny Llama, FedKSeed and
FedAvg, every client in every round).

Bytes, per round (all clients):
  fedtune  the encoded method messages (what the in-process engine reports; identical on Flower)
  flower   the same messages as Flower serialises them (records, arrays, chunks: what the Fleet
           API carries as object payloads, before HTTP headers and TLS)
  loopback all traffic on the loopback interface during the run divided by the rounds (an upper
           bound: HTTP, heartbeats, the SuperNodes' polling of the SuperLink, the workers' polling
           of their SuperNode, run submission; and anything else on this machine's loopback)
Memory: the peak of the summed resident memory of all Flower processes (sampled every 0.5 s).

    flock /tmp/fedtune-bench.lock python benchmarks/bench_flower.py   # flower.md, flower.json
    flock /tmp/fedtune-bench.lock python benchmarks/bench_flower.py --nodes 3 --methods fedkseed
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from fedtune.config import load_config
from fedtune.engines.flower.launch import LocalFederation
from fedtune.engines.inprocess import run

HERE = Path(__file__).resolve().parent
WORDS = ["red", "blue", "green", "small", "large", "quick", "slow", "bright", "dark", "warm"]
METHOD_OPTS = {"fedkseed": ["method.k=256"], "fedavg": [], "ferret": ["method.k=64"]}


def write_data(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            a, b = WORDS[i % 10], WORDS[(3 * i + 1) % 10]
            f.write(json.dumps({"instruction": "Repeat the second word.", "input": f"{a} {b}",
                                "output": b, "category": ["c0", "c1", "c2"][i % 3]}) + "\n")


def overrides(data: Path, nodes: int, method: str, rounds: int) -> list[str]:
    return [
        "model.source=tiny", "model.tiny_hidden=32", "data.source=jsonl", f"data.path={data}",
        "data.max_length=48", "partition.scheme=iid", f"partition.num_clients={nodes}",
        f"federation.rounds={rounds}", "federation.clients_per_round=1.0",
        "federation.round_timeout=300", "train.local_steps=2", "train.batch_size=4",
        "train.lr=0.05", "eval.max_examples=8", "eval.generate=false", f"method.name={method}",
        "output.save_model=false", "data.task=instruction", "train.optimizer=sgd",
        "eval.batch_size=16", "eval.generate_examples=64", "eval.max_new_tokens=4",
        *METHOD_OPTS[method]]


class MemorySampler(threading.Thread):
    def __init__(self, fed: LocalFederation, period: float = 0.5):
        super().__init__(daemon=True)
        self.fed, self.period, self.peak, self.stop_ = fed, period, 0.0, threading.Event()

    def total(self) -> float:
        procs = {}
        for p in self.fed._all:
            try:
                root = psutil.Process(p.pid)
                procs[root.pid] = root
                procs.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        rss = 0
        for proc in procs.values():
            try:
                rss += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return rss / 2**20

    def run(self) -> None:
        while not self.stop_.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(self.period)


def loopback_bytes() -> int:
    c = psutil.net_io_counters(pernic=True).get("lo")
    return (c.bytes_sent + c.bytes_recv) // 2 if c else 0  # each byte is sent and received once


def bench_one(work: Path, data: Path, nodes: int, method: str, rounds: int,
              threads: int) -> dict:
    cfg = load_config(None, overrides(data, nodes, method, rounds))
    t0 = time.perf_counter()
    ref = run(cfg, work / f"{method}-{nodes}-inprocess", progress=False)
    t_inproc = time.perf_counter() - t0
    t0 = time.perf_counter()
    with LocalFederation(work / f"fed-{method}-{nodes}", list(range(nodes)),
                         threads=threads) as fed:
        t_start = time.perf_counter() - t0
        sampler = MemorySampler(fed)
        sampler.start()
        lo0 = loopback_bytes()
        t1 = time.perf_counter()
        run_dir = work / f"{method}-{nodes}-flower"
        rows = fed.run(cfg, run_dir, timeout=1200)
        t_run = time.perf_counter() - t1
        lo = loopback_bytes() - lo0
        sampler.stop_.set()
        sampler.join()
    flower = json.loads((run_dir / "flower.json").read_text())
    rounds_f, rounds_i = rows[1:], ref[1:]
    assert all(r["clients"] == list(range(nodes)) for r in rounds_f), "a client was dropped"

    def mean(xs):
        return sum(xs) / len(xs)

    return {
        "method": method, "nodes": nodes, "rounds": rounds,
        "round_s_inprocess": mean([r["time_round"] for r in rounds_i]),
        "round_s_flower": mean([r["time_round"] for r in rounds_f]),
        "fit_s_inprocess": mean([r["time_fit"] for r in rounds_i]),
        "exchange_s_flower": mean([x["time_network_round"] for x in flower["rounds"]]),
        "bytes_fedtune": mean([r["bytes_up_total"] + r["bytes_down_total"] for r in rounds_f]),
        "bytes_fedtune_inprocess": mean([r["bytes_up_total"] + r["bytes_down_total"]
                                         for r in rounds_i]),
        "bytes_flower": mean([x["flower_up_bytes"] + x["flower_down_bytes"]
                              for x in flower["rounds"]]),
        "bytes_loopback": lo / rounds,
        "peak_mib_flower": sampler.peak,
        "peak_mib_inprocess": max(r["peak_rss_mb"] for r in ref),
        "startup_s": t_start, "run_s_flower": t_run, "run_s_inprocess": t_inproc,
    }


TABLE = [
    ("method", "method", "s"), ("nodes", "nodes", "d"),
    ("round_s_inprocess", "round s in-process", ".2f"), ("round_s_flower", "round s Flower", ".2f"),
    ("added_s", "added s/round", ".2f"),
    ("fit_s_inprocess", "fit s in-process", ".2f"), ("exchange_s_flower", "exchange s Flower", ".2f"),
    ("bytes_fedtune", "fedtune B/round", ",.0f"), ("bytes_flower", "Flower msg B/round", ",.0f"),
    ("extra_b_msg", "extra B/msg", ",.0f"), ("bytes_loopback", "loopback B/round", ",.0f"),
    ("peak_mib_inprocess", "MiB in-process", ",.0f"), ("peak_mib_flower", "MiB Flower (all)", ",.0f"),
    ("startup_s", "start s", ".0f"),
]


def table(results: list[dict]) -> str:
    for r in results:
        r["added_s"] = r["round_s_flower"] - r["round_s_inprocess"]
        r["extra_b_msg"] = (r["bytes_flower"] - r["bytes_fedtune"]) / (2 * r["nodes"])
    head = "| " + " | ".join(t for _, t, _ in TABLE) + " |"
    sep = "|" + "|".join("---:" if f != "s" else "---" for _, _, f in TABLE) + "|"
    lines = [head, sep]
    for r in results:
        lines.append("| " + " | ".join(format(r[k], f) for k, _, f in TABLE) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 20])
    p.add_argument("--methods", nargs="+", default=["fedkseed", "fedavg"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per ClientApp worker")
    p.add_argument("--out", default=str(HERE / "flower.json"))
    p.add_argument("--md", default=str(HERE / "flower.md"), help="the table ('' for none)")
    p.add_argument("--rewrite", action="store_true",
                   help="only rewrite --md from the results in --out (no measuring)")
    args = p.parse_args(argv)
    if args.rewrite:
        saved = json.loads(Path(args.out).read_text())
        res = saved["results"]
        Path(args.md).write_text(MD.format(table=table(res), rounds=res[0]["rounds"],
                                           threads=args.threads, **saved["meta"]))
        return 0
    t_all, load0 = time.perf_counter(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        write_data(data, 40 * max(args.nodes))
        for method in args.methods:
            for n in args.nodes:
                t0 = time.perf_counter()
                res = bench_one(work, data, n, method, args.rounds, args.threads)
                results.append(res)
                print(f"{method} {n} nodes: {json.dumps(res)} ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB, shared with other "
                       f"jobs (load average at start {load0:.1f})",
            "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
                        f"flwr {importlib.metadata.version('flwr')}",
            "command": "python benchmarks/bench_flower.py " + " ".join(argv or sys.argv[1:]),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": time.perf_counter() - t_all}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results))
    if args.md:
        Path(args.md).write_text(MD.format(table=table(results), rounds=args.rounds,
                                           threads=args.threads, **meta))
    return 0


MD = """# Flower's network layer: what it adds

Written by `benchmarks/bench_flower.py`. A SuperLink and N SuperNodes on 127.0.0.1 (each
SuperNode with its long-lived fedtune ClientApp worker, {threads} torch thread(s) each), every
client in every round, {rounds} rounds; the in-process engine runs the same experiment (tiny
Llama, hidden 32, 2 layers, 2 local steps of batch 4, 40 examples per client, evaluation on 8
examples without generation). Times are means over the rounds.

{table}

- *round s*: a round's wall time as the ServerApp (or the in-process loop) measures it: sampling,
  downloads, the clients' work, aggregation, evaluation.
- *fit s in-process*: the clients' local work, one after another. *exchange s Flower*: from the
  ServerApp sending the round's messages to holding every reply (the clients train in
  parallel processes on the same 2 cores).
- *fedtune B/round*: the encoded method messages, up + down, all clients (the same on both
  engines); *Flower msg B/round*: the same messages as Flower serialises them (records, arrays,
  chunks), before HTTP and TLS; *loopback B/round*: everything on the loopback interface during
  the Flower run, divided by the rounds (HTTP, the SuperNodes' polling of the SuperLink, the
  workers' polling of their SuperNode, heartbeats; an upper bound: the machine is shared).
  Here every message crosses the loopback three times (ServerApp -> SuperLink -> SuperNode ->
  ClientApp worker, and back), so FedAvg's loopback bytes are ~2.6x its messages; across
  machines only the SuperLink <-> SuperNode hop is on the network, carrying the *Flower msg*
  bytes plus HTTP/TLS framing and the SuperNodes' polling.
- *added s/round* = round s Flower - round s in-process; *extra B/msg* = (Flower msg - fedtune)
  / (2 N): what Flower's records add to each message.
- *MiB*: peak resident memory of the in-process engine's one process, and the peak of the sum
  over all Flower processes (SuperLink, its ServerApp, SuperNodes, workers).
- *start s*: starting the SuperLink and the SuperNodes (the workers then load their model and
  data during the ServerApp's handshake, before round 1).

Where the time goes: a SuperNode that finds no message waiting sleeps 3 s before it asks the
SuperLink again (flwr 1.41, `start_client_internal`), so a round's messages reach an idle client
up to 3 s after the ServerApp sent them; the reply goes back as soon as the ClientApp returns
(the SuperNode polls its ClientApp every 0.5 s, the worker polls the SuperNode every 0.2 s), and
the ServerApp pulls replies every 0.1 s (Flower's own `send_and_receive` waits 3 s between
pulls, so fedtune pushes and pulls itself). Each message is stored in the SuperLink's object
store and pulled by its SuperNode over HTTP. With N clients on 2 cores, the clients' work itself
is the same CPU time as in-process, only run in parallel processes.

_Command:_ `flock /tmp/fedtune-bench.lock {command}`  
_Machine:_ {machine}; {software}  
_Measured:_ {measured}, {wall_s:.0f} s in all
"""


if __name__ == "__main__":
    sys.exit(main())
