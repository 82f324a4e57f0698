"""errors.py says where every error sknock raises lives: hold it to that, over every module of the package."""

from __future__ import annotations

import importlib
import pkgutil
import re

import sknock
from sknock import errors


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of sknock, by its dotted name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(sknock.__path__, "sknock."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[f"{info.name}.{value.__qualname__}"] = value
    return found


def _listed_at_their_edge() -> set[str]:
    edge_part = errors.__doc__.split("Defined with their edge:")[1].split("Not sknock errors:")[0]  # type: ignore[union-attr]
    return set(re.findall(r"``(sknock\.[\w.]+)``", edge_part))


def test_every_error_is_in_errors_py_or_listed_there_with_its_module() -> None:
    classes = _exception_classes()
    listed = _listed_at_their_edge()
    assert listed, "errors.py lists the errors kept at their edge"
    assert listed <= set(classes), f"listed but not defined there: {sorted(listed - set(classes))}"
    not_sknocks = re.findall(r"``(sknock\.[\w.]+)``", errors.__doc__.split("Not sknock errors:")[1])  # type: ignore[union-attr]
    for name, cls in classes.items():
        short = name.rsplit(".", 1)[1]
        if cls.__module__ == "sknock.errors" or short.startswith("_") or name in not_sknocks:
            continue
        assert name in listed, f"{name} is neither in sknock/errors.py nor listed in its docstring"
    for name in listed:
        assert issubclass(classes[name], errors.SknockError), name
    for name in not_sknocks:
        assert not issubclass(classes[name], errors.SknockError), name


def test_the_library_s_errors_are_in_all() -> None:
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    assert defined <= set(errors.__all__)
