"""One error root: every exception class of these parts is in errors.py's drawn tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

from testbed import errors

#: The parts whose modules are checked (others have their own branches).
PARTS = (
    "protocol",
    "broker",
    "block",
    "compare",
    "supervise",
    "libvirt",
    "iotests",
    "qemu",
    "guest",
)
#: Outside the tree on purpose (errors.py's docstring says why).
OUTSIDE = {"testbed.broker.gate._Refused", "testbed.libvirt.emulator.EmulatorRefusal"}


def _modules() -> list[str]:
    names = ["testbed.transport", "testbed.errors"]
    for part in PARTS:
        package = importlib.import_module(f"testbed.{part}")
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found[f"{name}.{cls.__qualname__}"] = cls
    return found


def test_every_exception_class_is_in_errors_py_under_the_root() -> None:
    classes = _exception_classes()
    assert classes, "no exception classes found: the walk is broken"
    stray = sorted(
        name
        for name, cls in classes.items()
        if name not in OUTSIDE
        and (cls.__module__ != "testbed.errors" or not issubclass(cls, errors.TestbedError))
    )
    assert stray == [], f"exception classes outside testbed/errors.py's tree: {stray}"


def test_the_drawn_tree_names_every_class_in_errors_py() -> None:
    assert errors.__doc__ is not None
    drawn = {"TestbedError", *re.findall(r"\+-- (\w+)", errors.__doc__)}
    defined = {
        name
        for name, cls in vars(errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, BaseException)
        and cls.__module__ == "testbed.errors"
    }
    assert defined - drawn == set(), "classes in errors.py missing from its drawn tree"
    assert drawn - defined == set(), "the drawn tree names classes errors.py does not define"
