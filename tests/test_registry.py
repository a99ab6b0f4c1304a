"""The method registry: every method once, by a unique name and a unique wire id."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from fedtune.methods import registry


def test_names_and_wire_ids_are_unique():
    specs = list(registry.METHODS.values())
    assert len({s.method_id for s in specs}) == len(specs)
    assert {"fedavg", "fedzo", "fedkseed", "fedkseed_pro", "ferret", "fedit", "federa"} <= set(
        registry.METHODS)


def test_a_second_method_with_a_taken_name_or_id_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    ferret = registry.get_method("ferret")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(dataclasses.replace(ferret, method_id=200))
    with pytest.raises(ValueError, match="already 'ferret'"):
        registry.register(dataclasses.replace(ferret, name="ferret2"))
    registry.register(dataclasses.replace(ferret, name="ferret2", method_id=200))
    assert registry.get_method("ferret2").method_id == 200
    with pytest.raises(KeyError, match="unknown method"):
        registry.get_method("nope")


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_halves_are_classes_with_one_constructor_shape_and_the_spec_wire_id(name):
    """A spec names its server and client classes (no forwarding lambdas): every server takes
    (cfg, initial, run_seed, weighting), every client (cfg, model, run_seed), and both carry the
    spec's wire id."""
    spec = registry.get_method(name)
    for cls, params in ((spec.make_server, ["cfg", "initial", "run_seed", "weighting"]),
                        (spec.make_client, ["cfg", "model", "run_seed"])):
        assert inspect.isclass(cls), cls
        assert list(inspect.signature(cls).parameters) == params
        assert cls.method_id == spec.method_id
