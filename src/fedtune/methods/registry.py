"""Name -> method. Adding a method means adding its module and one line here."""

from __future__ import annotations

import importlib

from fedtune.methods.base import MethodSpec

_MODULES = ["fedavg", "lora", "ferret", "fedkseed", "fedzo"]

METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    """Add ``spec``; a name or wire id that is already taken is a programming error (two
    methods sharing an id would accept each other's messages)."""
    if spec.name in METHODS:
        raise ValueError(f"method name {spec.name!r} is registered twice")
    taken = {s.method_id: s.name for s in METHODS.values()}
    if spec.method_id in taken:
        raise ValueError(f"method id {spec.method_id} of {spec.name!r} is already "
                         f"{taken[spec.method_id]!r}'s")
    METHODS[spec.name] = spec


for _name in _MODULES:
    _mod = importlib.import_module(f"fedtune.methods.{_name}")
    for _spec in getattr(_mod, "METHODS", [getattr(_mod, "METHOD", None)]):
        if _spec is not None:
            register(_spec)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None
