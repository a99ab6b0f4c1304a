"""Test helpers for the Flower engine: an in-process reference in which every client has its own
client half (as every SuperNode has on Flower), to tell the shared-half effects of the in-process
engine apart from anything the network layer does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtune import experiment as ex
from fedtune.config import ExperimentConfig
from fedtune.engines.rounds import ClientResult, Progress, federate, fit_client


class PerClientTransport:
    """Like the in-process LocalTransport, but each client keeps its own half and model."""

    def __init__(self, exp: ex.Experiment):
        self.exp = exp
        self.halves: dict[int, object] = {}

    def fit_round(self, round_: int, downloads: dict[int, bytes]) -> list[ClientResult]:
        results = []
        for cid, down in downloads.items():
            if cid not in self.halves:
                self.halves[cid] = ex.build_client(self.exp, ex.build_model(self.exp))
            results.append(fit_client(self.exp, self.halves[cid], round_, cid, down))
        return results


def per_client_run(cfg: ExperimentConfig, run_dir: Path,
                   transport: type[PerClientTransport] = PerClientTransport) -> list[dict]:
    exp = ex.setup(cfg)
    server = ex.build_server(exp, ex.build_model(exp))
    evaluator = ex.build_client(exp, ex.build_model(exp))
    return federate(exp, server, evaluator, transport(exp), run_dir, out=Progress(False))


@contextmanager
def running_federation(workdir: Path, partitions: list[int], **kw) -> Iterator:
    """A started ``LocalFederation`` on 127.0.0.1; every process it started is stopped when the
    block ends, pass or fail, and checked to be gone."""
    from fedtune.engines.flower.launch import LocalFederation

    fed = LocalFederation(workdir, partitions, **kw)
    try:
        yield fed.start()
    finally:
        fed.stop()
        assert all(p.poll() is not None for p in fed._all)


def until_logged(log: Path, text: str, run_dir: Path, timeout: float = 300.0) -> None:
    """Wait until ``text`` appears in ``log``; fail at once with the ServerApp's error if the
    run in ``run_dir`` failed first, or with the log's end after ``timeout`` seconds."""
    from fedtune.engines.flower.launch import raise_if_failed

    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        raise_if_failed(run_dir)
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else log
        time.sleep(0.02)
