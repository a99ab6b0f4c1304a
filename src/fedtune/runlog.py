"""The run folder: resolved config, metrics per round (JSON lines), the checkpoint, the summary.

::

    RUN_DIR/config.yaml        the resolved config (what ``--resume`` reads back)
    RUN_DIR/metrics.jsonl      one JSON object per evaluation point (round 0 = before training)
    RUN_DIR/checkpoint.pt      server state + engine state after the last completed round
    RUN_DIR/summary.json       written at the end: first/last metrics, totals, peak memory
    RUN_DIR/model.safetensors  the final trainable weights (output.save_model)

Every file is replaced atomically (write to a temporary file in the folder, fsync, rename), so
a run killed at any instant (kill -9 included) leaves the previous complete version.
"""

from __future__ import annotations

import io
import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedtune.randomness import RANDOMNESS_VERSION


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunLog:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoint_path = self.dir / "checkpoint.pt"

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl with exactly ``rows`` (so a resumed run never keeps the lines
        of a round that was not checkpointed)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save({**state, "randomness_version": RANDOMNESS_VERSION},
                          self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint, or None; refuses one written under another randomness version (its
        seed log would rebuild other directions: a silently different model)."""
        if not self.checkpoint_path.exists():
            return None
        state = torch.load(self.checkpoint_path, weights_only=False)
        version = state.get("randomness_version", 2) if isinstance(state, dict) else None
        if version != RANDOMNESS_VERSION:
            raise RuntimeError(
                f"{self.checkpoint_path} was written with shared randomness v{version}; this "
                f"fedtune uses v{RANDOMNESS_VERSION}, under which its seeds rebuild other "
                "directions. Start the run again, or resume it with the fedtune release that "
                "wrote it.")
        return state

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.dir / "summary.json",
                           (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header, format spec)."""
    head = [h for _, h, _ in columns]
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
