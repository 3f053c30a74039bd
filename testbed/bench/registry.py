"""A registry of kinds of parts, each in its own module, loaded on first use.

A package lists its parts as ``name -> module`` (one registration line
each); every module defines one object named ``PART``.  Experiments iterate
the registry in registration order, so adding a part is a new module plus a
line, and no experiment holds its own list of names.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from testbed.errors import PartKindError, UnknownPartError

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> module`` under ``package``; :meth:`get` imports on first use."""

    def __init__(self, package: str, modules: Mapping[str, str], kind: Any) -> None:
        # ``kind`` is T's class, checked at load (Any: abstract classes are typical)
        self.package = package
        self._modules = dict(modules)
        self._kind = kind
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return list(self._modules)

    def get(self, name: str) -> T:
        """The part called ``name``; ``KeyError`` names the known ones."""
        if name not in self._modules:
            known = ", ".join(self._modules)
            raise UnknownPartError(f"no {self._kind.__name__} {name!r} (known: {known})")
        if name not in self._loaded:
            module = importlib.import_module(f"{self.package}.{self._modules[name]}")
            part = getattr(module, "PART", None)
            if not isinstance(part, self._kind):
                raise PartKindError(
                    f"{module.__name__}.PART is {type(part).__name__}, not {self._kind.__name__}"
                )
            if getattr(part, "name", name) != name:
                raise PartKindError(
                    f"{module.__name__}.PART is named {getattr(part, 'name', '')!r}, "
                    f"registered as {name!r}"
                )
            self._loaded[name] = part
        loaded: T = self._loaded[name]
        return loaded

    def __iter__(self) -> Iterator[T]:
        return (self.get(n) for n in self._modules)

    def select(self, names: list[str] | None) -> list[T]:
        """The parts named (all when ``names`` is None), in registration order."""
        if names is None:
            return list(self)
        for n in names:
            self.get(n)  # raises on an unknown name
        return [self.get(n) for n in self._modules if n in names]
