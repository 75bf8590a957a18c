"""Name -> component registries with a "did you mean" lookup error.

Encoders, fusion strategies and survival heads register themselves here so that configs can
name them as strings and conformance tests can run every registered component.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered; the message suggests the closest registered one."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


def suggest(name: str, options: Iterable[str]) -> str:
    """Return `"; did you mean 'x'?"` for the closest option, or an empty string."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def look_up_option(name: str, options: Iterable[str], *, kind: str = "option") -> str:
    """Validate a string option, raising UnknownNameError (a ValueError) that suggests the closest valid value.

    >>> look_up_option("efron", ["efron", "breslow"], kind="ties")
    'efron'
    """
    options = list(options)
    if name in options:
        return name
    raise UnknownNameError(
        f"unknown {kind} {name!r}{suggest(name, options)} (valid: {', '.join(sorted(options))})"
    )


class Registry(Generic[T]):
    """A named collection of components (classes or factories).

    >>> fusions: Registry[type] = Registry("fusion")
    >>> @fusions.register("late")
    ... class Late: ...
    >>> fusions.get("late") is Late
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering `obj` under `name`; a name can be registered once."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        """Register `obj` under `name` without the decorator syntax."""
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """Return the component named `name`; unknown names raise UnknownNameError with a suggestion."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none registered"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggest(name, self._items)} (known: {known})"
            ) from None

    def list(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"


# The project's component registries. Components register on import of their package;
# `all_registries()` imports the packages so every registered name is visible.
ENCODERS: Registry[Any] = Registry("encoder")
FUSIONS: Registry[Any] = Registry("fusion")
HEADS: Registry[Any] = Registry("head")


def all_registries() -> dict[str, Registry[Any]]:
    """Import every component package and return the registries by kind."""
    import importlib

    for pkg in ("survfuse.encoders", "survfuse.fusion", "survfuse.survival"):
        importlib.import_module(pkg)
    return {"encoders": ENCODERS, "fusions": FUSIONS, "heads": HEADS}
