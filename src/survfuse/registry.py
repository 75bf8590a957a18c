"""Name -> component registries with a "did you mean" lookup error.

Encoders, fusion strategies and survival heads register themselves here so that configs can
name them as strings and conformance tests can run every registered component.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Most names an unknown-name error shows: its "did you mean" and, for long lists (108 cell
#: ids), the valid names it quotes; a shorter list of valid names is shown whole.
MAX_CANDIDATES = 5
_SHOW_ALL_UP_TO = 12


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered; the message suggests the closest registered one."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


def suggest(name: str, options: Iterable[str]) -> str:
    """Return a did-you-mean hint for `name` among `options`, or an empty string.

    `"; did you mean 'x'?"` for the closest option, `"; did you mean 'x'? (or 'y', 'z')"` when
    others are close too (at most `MAX_CANDIDATES` in all).
    """
    match = difflib.get_close_matches(name, list(options), n=MAX_CANDIDATES, cutoff=0.5)
    if not match:
        return ""
    others = f" (or {', '.join(repr(m) for m in match[1:])})" if len(match) > 1 else ""
    return f"; did you mean {match[0]!r}?{others}"


def closest(name: str, options: Iterable[str], n: int = MAX_CANDIDATES) -> list[str]:
    """Return the `n` options most like `name`: those containing it first, then by difflib ratio."""

    def score(option: str) -> tuple[bool, float, str]:
        ratio = difflib.SequenceMatcher(None, name, option).ratio()
        return (name not in option, -ratio, option)

    return sorted(options, key=score)[:n]


def valid_names(name: str, options: Iterable[str], *, label: str = "valid") -> str:
    """Return the valid names as a short string.

    `"valid: a, b, c"`, or for a long list its size and the `MAX_CANDIDATES` closest to `name`:
    `"108 valid; closest: a, b, c, d, e"`.
    """
    options = sorted(options)
    if len(options) <= _SHOW_ALL_UP_TO:
        return f"{label}: {', '.join(options) or 'none'}"
    return f"{len(options)} {label}; closest: {', '.join(closest(name, options))}"


def look_up_option(
    name: str, options: Iterable[str], *, kind: str = "option", where: str = ""
) -> str:
    """Validate a string option, raising UnknownNameError (a ValueError) on an unknown one.

    The error suggests the closest valid values (at most `MAX_CANDIDATES`); `where` tells where the
    full list is.

    >>> look_up_option("efron", ["efron", "breslow"], kind="ties")
    'efron'
    """
    options = list(options)
    if name in options:
        return name
    see = f"; all: {where}" if where else ""
    raise UnknownNameError(
        f"unknown {kind} {name!r}{suggest(name, options)} ({valid_names(name, options)}{see})"
    )


def describe(obj: object) -> str:
    """First line of `obj`'s docstring, without pointers to module docs ('' when it has none)."""
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n", 1)[0].strip() if doc.strip() else ""
    return re.sub(r"\s*\(see (the )?module docstring[^)]*\)", "", first)


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
        """Return a decorator registering `obj` under `name`; a name can be registered once."""

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
            known = valid_names(name, self._items, label="known")
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggest(name, self._items)} ({known})"
            ) from None

    def list(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def describe(self, name: str) -> str:
        """One line on the component `name`: the first line of its docstring."""
        return describe(self.get(name))

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
