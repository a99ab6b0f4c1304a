"""The in-process engine: every client simulated in turn on the one copy of the model, through
the shared round loop (``engines.rounds``).

The process holds one copy of the model, on ``model.device`` in ``model.dtype``
(``experiment.build_model``); batches go to it, messages and checkpoints stay on the CPU. On a
GPU the rows also carry ``peak_gpu_mb`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune import experiment as ex
from fedtune.config import ConfigError, ExperimentConfig
from fedtune.engines.rounds import ClientResult, Progress, federate, fit_client


class LocalTransport:
    """Every client simulated in turn in this process, on the shared client half."""

    def __init__(self, exp: ex.Experiment, client, out: Progress):
        self.exp, self.client, self.out = exp, client, out

    def fit_round(self, round_: int, downloads: dict[int, bytes]) -> list[ClientResult]:
        results = []
        for i, (cid, down) in enumerate(downloads.items()):
            label = (f"round {round_ + 1}/{self.exp.cfg.federation.rounds}  client {cid} "
                     f"({i + 1}/{len(downloads)})")
            res = fit_client(self.exp, self.client, round_, cid, down,
                             on_step=lambda s, loss, label=label: self.out.step(
                                 f"{label}  step {s + 1}  loss {loss:.4f}"))
            results.append(res)
            if res.error is not None:
                self.out.line(f"{label}  rejected: {res.error}")
            else:
                self.out.line(f"{label}  train loss {res.train_loss:.4f}  up "
                              f"{len(res.payload):,} B  down {len(down):,} B  "
                              f"{res.timings['fit']:.1f} s")
        return results


def run(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        overwrite: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run the experiment in this process; returns the metrics rows (round 0 is the evaluation
    before training). With ``resume`` the run continues from ``run_dir``'s checkpoint."""
    if cfg.federation.secure_aggregation:
        raise ConfigError("federation.secure_aggregation: the in-process engine simulates every "
                          "client in one process, so there is no one to hide an upload from; "
                          "run it on Flower (fedtune flower ...) or set it to false")
    out = Progress(progress)
    exp = ex.setup(cfg)
    model = ex.build_model(exp)
    client = ex.build_client(exp, model)
    server = ex.build_server(exp, model)
    return federate(exp, server, client, LocalTransport(exp, client, out), run_dir,
                    resume=resume, overwrite=overwrite, out=out)
