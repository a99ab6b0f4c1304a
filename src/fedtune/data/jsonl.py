"""Instruction JSONL, one example per line, in the Dolly shape (``instruction``, ``context``,
``response``, ``category``) or the Alpaca shape (``instruction``, ``input``, ``output``,
optionally ``category``)."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.data.errors import DataFileNotFoundError, DataFormatError


def _example(obj: object, where: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "response" in obj:  # Dolly
        keys = {"instruction": "instruction", "input": "context", "output": "response"}
    elif "output" in obj:  # Alpaca
        keys = {"instruction": "instruction", "input": "input", "output": "output"}
    else:
        raise DataFormatError(
            f"{where}: missing key 'response' (Dolly shape) or 'output' (Alpaca shape); "
            f"found keys {sorted(obj)}"
        )
    if "instruction" not in obj:
        raise DataFormatError(f"{where}: missing key 'instruction'; found keys {sorted(obj)}")
    ex = {ours: obj.get(theirs, "") for ours, theirs in keys.items()}
    ex["category"] = obj.get("category", "")
    for key, value in ex.items():
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: {key!r} must be a string, got {value!r:.60}")
    return ex


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Raw examples {instruction, input, output, category} ("" where absent); blank lines are
    skipped. Errors name the file and the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileNotFoundError(
            f"JSONL file {str(path)!r} does not exist; set data.path to an instruction JSONL file"
        )
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start}); data.path must be an "
                              "instruction JSONL file") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: not valid JSON ({e.msg})") from None
        examples.append(_example(obj, where))
    if not examples:
        raise DataFormatError(f"{path}: no examples (the file is empty)")
    return examples
