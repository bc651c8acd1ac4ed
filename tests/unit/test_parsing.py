"""Hostile nesting fails as malformed input: `parsing.loads` (JSON) and `parsing.safe_load_bounded` (YAML)."""

import json

import pytest

from alphaalign import parsing


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def test_json_as_deep_as_allowed_loads_and_one_level_more_is_malformed():
    value = parsing.loads(nested(parsing.MAX_DEPTH))
    for _ in range(parsing.MAX_DEPTH):
        (value,) = value
    assert value == 1
    with pytest.raises(json.JSONDecodeError, match="nested more than 100 levels deep") as err:
        parsing.loads('\n{"a":\n' + nested(parsing.MAX_DEPTH))
    assert (err.value.lineno, err.value.colno) == (3, 100)  # the bracket that goes one level too deep


@pytest.mark.parametrize("data", [nested(100_000), nested(100_000).encode(), '{"a": ' + '{"b": ' * 5_000])
def test_json_far_past_the_recursion_limit_is_malformed_not_a_recursion_error(data):
    with pytest.raises(parsing.UnusableJSON):
        parsing.loads(data)


def test_brackets_inside_strings_are_not_nesting():
    text = json.dumps({"a": "[{" * 500, "b": ['"]\\', "[" * 300]})
    assert parsing.loads(text) == json.loads(text)
    assert parsing.loads(text.encode()) == json.loads(text)


def test_yaml_nesting_counts_aliases():
    """Each anchor's text nests 60 and 50 levels: in the text no deeper than 61, loaded 111 deep."""
    with pytest.raises(ValueError, match=r"^b(\.0)*: nests more than 100 levels deep"):
        parsing.safe_load_bounded("a: &a " + nested(60) + "\nb: " + nested(50, "*a"))
    assert parsing.safe_load_bounded("a: &a " + nested(49) + "\nb: " + nested(50, "*a"))["b"]


def test_a_lone_surrogate_is_malformed_and_named_by_its_path():
    assert parsing.loads('{"a": "emoji \\ud83d\\ude00"}') == {
        "a": "emoji \U0001f600"
    }  # a pair is one character
    for text, where in [
        ('{"a": [1, {"b": "x\\ud800"}]}', "a.1.b"),
        ('["ok", "\\uDC00 y"]', "1"),
        ('"\\udbff"', "the value"),
    ]:
        with pytest.raises(parsing.UnusableJSON, match=rf"^{where}: a lone surrogate \\u[dD]"):
            parsing.loads(text)
        with pytest.raises(parsing.UnusableJSON):
            parsing.loads(text.encode())
    assert parsing.loads('"\\\\ud800"') == "\\ud800"  # an escaped backslash, then plain letters
