"""What secure aggregation costs on Flower: bytes and seconds per round with and without SecAgg+
(``federation.secure_aggregation``) at 3, 10 and 20 SuperNodes, in the Flower benchmark's setup
(``bench_flower.py``: a SuperLink and N SuperNodes with their fedtune ClientApp workers on
127.0.0.1, tiny Llama, every client in every round). The plain and the secure run share one
federation per N.

Bytes are Flower's serialised messages (records, arrays, chunks) per round, all clients: plain,
the download and upload of each client; secure, the four SecAgg+ exchanges (keys, encrypted
shares, the masked vectors, the unmasking shares).

    flock /tmp/fedtune-bench.lock python benchmarks/bench_secagg.py   # secagg.md, secagg.json
    flock /tmp/fedtune-bench.lock python benchmarks/bench_secagg.py --nodes 3 --methods fedkseed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_flower import overrides, write_data
from benchinfo import environment

from fedtune.config import load_config
from fedtune.engines.flower.launch import LocalFederation

HERE = Path(__file__).resolve().parent


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def bench_pair(work: Path, data: Path, nodes: int, method: str, rounds: int,
               threads: int) -> list[dict]:
    out = []
    with LocalFederation(work / f"fed-{method}-{nodes}", list(range(nodes)),
                         threads=threads) as fed:
        for secure in (False, True):
            cfg = load_config(None, [*overrides(data, nodes, method, rounds),
                                     f"federation.secure_aggregation={str(secure).lower()}"])
            run_dir = work / f"{method}-{nodes}-{'secure' if secure else 'plain'}"
            rows = fed.run(cfg, run_dir, timeout=1800)
            flower = json.loads((run_dir / "flower.json").read_text())["rounds"]
            assert all(r["clients"] == list(range(nodes)) for r in rows[1:]), "a client dropped"

            def mean(xs):
                return sum(xs) / len(xs)

            out.append({
                "method": method, "nodes": nodes, "secure": secure, "rounds": rounds,
                "round_s": mean([r["time_round"] for r in rows[1:]]),
                "exchange_s": mean([x["time_network_round"] for x in flower]),
                "up_b": mean([x["flower_up_bytes"] for x in flower]),
                "down_b": mean([x["flower_down_bytes"] for x in flower]),
                "fedtune_up_b": mean([r["bytes_up_total"] for r in rows[1:]]),
                "clipped": sum(x.get("clipped", 0) for x in flower),
                "load": loadavg()})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


TABLE = [("method", "method", "s"), ("nodes", "nodes", "d"), ("mode", "aggregation", "s"),
         ("round_s", "round s", ".2f"), ("exchange_s", "exchange s", ".2f"),
         ("up_b", "Flower up B/round", ",.0f"), ("down_b", "Flower down B/round", ",.0f"),
         ("up_per_client", "up B/client", ",.0f"), ("ratio_up", "up x plain", ".2f"),
         ("added_s", "added s/round", ".2f")]


def table(results: list[dict]) -> str:
    plain = {(r["method"], r["nodes"]): r for r in results if not r["secure"]}
    for r in results:
        p = plain[(r["method"], r["nodes"])]
        r["mode"] = "SecAgg+" if r["secure"] else "plain"
        r["up_per_client"] = r["up_b"] / r["nodes"]
        r["ratio_up"] = r["up_b"] / p["up_b"]
        r["added_s"] = r["round_s"] - p["round_s"]
    lines = ["| " + " | ".join(t for _, t, _ in TABLE) + " |",
             "|" + "|".join("---:" if f != "s" else "---" for _, _, f in TABLE) + "|"]
    lines += ["| " + " | ".join(format(r[k], f) for k, _, f in TABLE) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 20])
    p.add_argument("--methods", nargs="+", default=["fedkseed", "fedavg"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per ClientApp worker")
    p.add_argument("--out", default=str(HERE / "secagg.json"))
    p.add_argument("--md", default=str(HERE / "secagg.md"), help="the table ('' for none)")
    args = p.parse_args(argv)
    t_all, load0 = time.perf_counter(), loadavg()
    results: list[dict] = []

    def save() -> dict:  # after every pair, so a failure later keeps what was measured
        meta = {"environment": environment(), "load_start": load0, "load_end": loadavg(),
                "command": "python benchmarks/bench_secagg.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]),
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "wall_s": time.perf_counter() - t_all, "cpus": os.cpu_count()}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        return meta

    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        write_data(data, 40 * max(args.nodes))
        for method in args.methods:
            for n in args.nodes:
                results += bench_pair(work, data, n, method, args.rounds, args.threads)
                meta = save()
    print(table(results))
    if args.md:
        Path(args.md).write_text(MD.format(table=table(results), rounds=args.rounds, **meta))
    return 0


MD = """# Secure aggregation on Flower: what SecAgg+ costs

Written by `benchmarks/bench_secagg.py`: the setup of `bench_flower.py` (a SuperLink and N
SuperNodes with their fedtune ClientApp workers on 127.0.0.1; tiny Llama, hidden 32, 2 layers;
2 local steps of batch 4, 40 examples per client; every client in every round), {rounds}
rounds, each N once without and once with `federation.secure_aggregation: true` (SecAgg+ with
the defaults: every client shares its keys with all the round's clients, threshold 0.67, clip
8, 2**22 levels). Times are means over the rounds.

{table}

- *round s*: a round's wall time in the ServerApp (downloads, the four SecAgg+ exchanges or
  the one plain exchange, aggregation, evaluation); *exchange s*: from sending the first
  message to holding the last reply (the unmasking included).
- *Flower up/down B/round*: the serialised messages of the round, all clients. Secure: the
  masked vector is one int64 per summed coordinate (plain FedAvg sends float32 weights, so about
  2x; FedKSeed's plain upload is sparse (steps x 6 B), its masked vector is dense, K x 8 B),
  plus per client O(N) public keys and encrypted shares.
- The download under SecAgg+ is always the full state (`since=None`; FedKSeed: K floats).
- Each SecAgg+ exchange waits for the SuperNodes' polling (up to 3 s each, see flower.md), so a
  secure round takes about three more polling delays than a plain one.

_Command:_ `flock /tmp/fedtune-bench.lock {command}`  
_Load (/proc/loadavg):_ {load_start} at the start, {load_end} at the end, {cpus} CPUs shared
with other jobs  
_Measured:_ {measured}, {wall_s:.0f} s in all
"""


if __name__ == "__main__":
    sys.exit(main())
