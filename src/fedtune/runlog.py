"""The run folder: resolved config, metrics per round (JSON lines), the checkpoint, the summary.

::

    RUN_DIR/config.yaml        the resolved config (what ``--resume`` reads back)
    RUN_DIR/metrics.jsonl      one JSON object per evaluation point (round 0 = before training)
    RUN_DIR/checkpoint.pt      server state + engine state after the last completed round,
                               with a digest and what run it belongs to (checked on resume)
    RUN_DIR/checkpoint.prev.pt the round before's (a damaged newest one falls back to it)
    RUN_DIR/summary.json       written at the end: first/last metrics, totals, peak memory
    RUN_DIR/model.safetensors  the final trainable weights (output.save_model)

Every file is replaced atomically (write to a temporary file in the folder, fsync, rename), so
a run killed at any instant (kill -9 included) leaves the previous complete version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import sys
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


CHECKPOINT_MAGIC = b"FTCK1\n"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (damaged, another run's, another version)."""


def _read_checkpoint(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    head = len(CHECKPOINT_MAGIC)
    if not data.startswith(CHECKPOINT_MAGIC):
        try:  # a checkpoint of a release before version 3 (plain torch.save)
            state = torch.load(io.BytesIO(data), weights_only=False)
        except Exception as e:  # noqa: BLE001 (any unpickling failure means damaged)
            raise CheckpointError(f"{path} is not a fedtune checkpoint or is damaged "
                                  f"({type(e).__name__})") from None
        version = state.get("randomness_version", 2) if isinstance(state, dict) else None
        raise CheckpointError(
            f"{path} was written with shared randomness v{version}; this fedtune uses "
            f"v{RANDOMNESS_VERSION}, under which its seeds rebuild other directions. Start the "
            "run again, or resume it with the fedtune release that wrote it.")
    digest, payload = data[head: head + 32], data[head + 32:]
    if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is damaged (its content does not match its digest)")
    return torch.load(io.BytesIO(payload), weights_only=False)


def _check_identity(path: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    saved = state.get("identity", {})
    if state.get("randomness_version") != RANDOMNESS_VERSION:
        raise CheckpointError(f"{path} was written with shared randomness "
                              f"v{state.get('randomness_version')}, this fedtune uses "
                              f"v{RANDOMNESS_VERSION}")
    for key, want in identity.items():
        if key in saved and saved[key] != want:
            raise CheckpointError(f"{path} belongs to another run: its {key} is "
                                  f"{_short(saved[key])}, this run's is {_short(want)}")


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunFolderError(RuntimeError):
    """A run folder that this run may not write (it holds another run, another process is
    writing it, or it is a file)."""


RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt",
             "summary.json", "model.safetensors")


class RunLog:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise RunFolderError(f"{self.dir} is a file, not a run folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = None
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.previous_path = self.dir / "checkpoint.prev.pt"

    def claim(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Make this process the folder's only writer (an advisory lock held until the process
        ends, so a run killed with -9 leaves no stale lock), and refuse to start a new run over
        a finished or interrupted one unless ``resume`` (continue it) or ``overwrite`` (its
        files are deleted first)."""
        import fcntl

        lock = open(self.dir / ".lock", "w")  # noqa: SIM115 (held for the process's life)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunFolderError(f"{self.dir}: another fedtune process is writing this run "
                                 "folder") from None
        self._lock = lock
        present = [n for n in RUN_FILES if (self.dir / n).exists()]
        if present and not resume:
            if not overwrite:
                raise RunFolderError(
                    f"{self.dir} holds a run ({', '.join(present)}); continue it with "
                    "--resume, replace it with --overwrite, or choose another --out")
            for n in present:
                (self.dir / n).unlink()

    def release(self) -> None:
        """Give up the folder (the lock of :meth:`claim`)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl with exactly ``rows`` (so a resumed run never keeps the lines
        of a round that was not checkpointed)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for lineno, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RunFolderError(f"{self.metrics_path}:{lineno}: not a JSON line ({e.msg}); "
                                     "the file was cut or edited") from None
        return rows

    def save_checkpoint(self, state: dict[str, Any], identity: dict[str, Any] | None = None) -> None:
        """Write the checkpoint, verified on load by a SHA-256 digest of its content and by
        ``identity`` (what run it belongs to); the one it replaces is kept as
        ``checkpoint.prev.pt`` so that a damaged newest one can fall back to it."""
        buf = io.BytesIO()
        torch.save({**state, "randomness_version": RANDOMNESS_VERSION,
                    "identity": identity or {}}, buf)
        payload = buf.getvalue()
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_path)
        atomic_write_bytes(self.checkpoint_path,
                           CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)

    def load_checkpoint(self, identity: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest intact checkpoint, or None if there is none. A damaged file (flipped
        bytes, cut short) falls back to the previous one; a checkpoint of another run
        (``identity`` differs: another method or settings) or of another randomness version is
        refused. Raises :class:`CheckpointError` with one line saying what is wrong."""
        damaged = []
        for path in (self.checkpoint_path, self.previous_path):
            if not path.exists():
                continue
            try:
                state = _read_checkpoint(path)
            except CheckpointError as e:
                damaged.append(str(e))
                continue
            _check_identity(path, state, identity or {})
            if damaged:
                print(f"fedtune: {damaged[0]}; resuming from {path.name} (one round earlier)",
                      file=sys.stderr)
            return state
        if damaged:
            raise CheckpointError("; ".join(damaged) + "; no intact checkpoint is left, so the "
                                  "run cannot resume (start it again)")
        return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json (atomically)."""
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
