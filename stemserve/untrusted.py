"""Checks applied where untrusted input is read: names that become paths, structures that
expand, and error messages that quote either.

Checkpoints, bag YAMLs, export sidecars and a Triton server's answers are all written by
someone else. A name read from one of them (a source, a model or checkpoint name, a graph's
file name) ends up as a path component, so it is checked against :data:`SAFE_NAME` where it
is read, not where it is used. A structure read from one of them may share references (a
pickle's memo, YAML aliases), so walking it as a tree can take exponential time and memory:
:func:`check_size` bounds the walk's total, and :func:`brief` quotes any value in a bounded
number of characters.
"""
from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from typing import Any

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
"""A name that may become one path component: letters, digits and ``_ . + -``, no separator,
no leading dot, at most 128 characters (and no ``..``, which :func:`is_safe_name` checks)."""

class _Brief(reprlib.Repr):
    """reprlib's bounded repr, for ints too: Python refuses to print one of over 4300
    digits, which a YAML hex number or a pickle spells in a few KB."""

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 128:
            return f"<an int of {value.bit_length()} bits>"
        return super().repr_int(value, level)


_BRIEF = _Brief()
_BRIEF.maxlevel = 3
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF_CHARS = 200


def is_safe_name(value: Any) -> bool:
    """Whether ``value`` is a string that may become one path component."""
    return (isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None
            and ".." not in value)


def safe_name(text: str, fallback: str = "model") -> str:
    """``text`` made into a :data:`SAFE_NAME` (other characters become ``_``), for names
    stemserve writes itself from a user's file name; ``fallback`` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", text)[:128].lstrip(".")
    name = re.sub(r"\.\.+", ".", name)
    return name if is_safe_name(name) else fallback


def brief(value: Any) -> str:
    """``repr(value)`` cut to a bounded size, however large or shared ``value`` is."""
    text = _BRIEF.repr(value)
    return text if len(text) <= _BRIEF_CHARS else text[:_BRIEF_CHARS - 3] + "..."


class TooLarge(ValueError):
    """A structure with more items than its reader allows (counted as a tree, shared
    references each time they are reached)."""


def check_size(value: Any, limit: int) -> int:
    """The number of items in ``value`` walked as a tree (containers and scalars, a shared
    reference counted each time it is reached); :class:`TooLarge` as soon as it passes
    ``limit``, so the walk itself is bounded."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            raise TooLarge(f"more than {limit} items")
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return count
