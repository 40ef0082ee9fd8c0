"""The checks applied where untrusted input is read: plain names, bounded quotes and bounded
walks, each at and around its limit."""
from __future__ import annotations

import pytest

from stemserve.untrusted import TooLarge, brief, check_size, is_safe_name, safe_name


@pytest.mark.parametrize("name", ["drums", "no_vocals", "htdemucs-1a2b3c", "model.v2", "a+b",
                                  "x" * 128])
def test_plain_names(name):
    assert is_safe_name(name) and safe_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "a..b", "/abs",
                                  "x" * 129, "naïve", "a b", 3, None, ["a"]])
def test_names_that_are_not_one_plain_path_component(name):
    assert not is_safe_name(name)


@pytest.mark.parametrize("text,made", [("My Song (v2)", "My_Song__v2_"), ("..x", "x"),
                                       ("a..b", "a.b"), ("", "model"), ("...", "model"),
                                       ("ü" * 200, "_" * 128)])
def test_a_file_name_is_made_plain(text, made):
    assert safe_name(text) == made and is_safe_name(made)


def test_a_quote_is_bounded_however_large_or_shared_the_value():
    shared: list = ["x" * 10_000]
    for _ in range(60):
        shared = [shared, shared]  # 2**60 leaves as a tree
    for value in (shared, {"k" * 10_000: shared}, 10 ** 5000, "y" * 10 ** 6, [[[[[[1]]]]]]):
        assert len(brief(value)) <= 200
    assert brief(10 ** 5000) == "<an int of 16610 bits>"
    assert brief("ok") == "'ok'" and brief(12) == "12"


def test_a_walk_counts_shared_references_and_stops_at_its_limit():
    leaf: list = []
    node = leaf
    for _ in range(40):
        node = [node, node]  # 2**41 - 1 items as a tree, 41 objects
    with pytest.raises(TooLarge, match="more than 1000 items"):
        check_size(node, 1000)
    flat = list(range(999))  # the list and its 999 items: 1000
    assert check_size(flat, 1000) == 1000
    with pytest.raises(TooLarge):
        check_size(flat + [0], 1000)
    assert check_size({"a": [1, 2]}, 5) == 5  # the dict, its key, the list and two items
