"""Parsing text that may be hostile (recipes, data files, files on disk, server replies): JSON and YAML whose
nesting would exhaust the call stack, whose aliases would fill the memory, or whose strings are not text fail
as malformed input does, with an error the caller turns into one line, never a RecursionError or a crash
later on (a tokenizer refuses a lone surrogate).
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

# Nesting levels a recipe, a data row, a file on disk or a server reply may have: the parsers, and the code that
# walks parsed values (deepcopy, validation, json.dumps), recurse once per level. Real inputs nest a few levels.
MAX_DEPTH = 100
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]')


class UnusableJSON(json.JSONDecodeError):
    """Valid JSON that no part of the project can use: nested more than MAX_DEPTH levels, or a string holding a
    lone surrogate. A `json.JSONDecodeError`, so callers report it as malformed JSON."""


def loads(data: str | bytes) -> Any:
    """`json.loads`, where a value nested more than MAX_DEPTH levels, or a string with a lone surrogate (an
    escape such as ``\\ud800`` that JSON allows and UTF-8 cannot encode), is malformed JSON (`UnusableJSON`).
    Python's parser would raise RecursionError near 1,000 levels, and code that walks the value, deeper in
    the stack, before that."""
    if isinstance(data, bytes):
        deep = data.count(b"[") + data.count(b"{") > MAX_DEPTH
        escaped = b"\\ud" in data or b"\\uD" in data
    else:
        deep = data.count("[") + data.count("{") > MAX_DEPTH
        escaped = "\\ud" in data or "\\uD" in data
    if deep:  # enough brackets to nest that deep: find the one that goes too deep before parsing
        doc = _text(data)
        depth = 0
        for token in _JSON_TOKEN.finditer(doc):
            bracket = token.group()
            if bracket in ("[", "{"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise UnusableJSON(f"nested more than {MAX_DEPTH} levels deep", doc, token.start())
            elif bracket in ("]", "}"):
                depth -= 1
    value = json.loads(data)
    # surrogate escapes (an emoji written as a pair of them, usually): each must be half of a pair
    if escaped:
        found = _lone_surrogate(value)
        if found is not None:
            where, char = found
            doc = _text(data)
            escape = re.search(re.escape(f"\\u{ord(char):04x}"), doc, re.IGNORECASE)
            raise UnusableJSON(
                f"{where}: a lone surrogate \\u{ord(char):04x}, which is not text",
                doc,
                escape.start() if escape else 0,
            )
    return value


def json_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each line of a JSON Lines text that is not blank. Lines end at "\\n" only: a JSON
    string may hold U+2028 or U+0085 as they are (json.dumps(ensure_ascii=False) writes them so), which
    str.splitlines() would take for line ends."""
    return [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _text(data: str | bytes) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(dotted path, character) of the first string, key or value, that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path or "the value", value[exc.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


MAX_YAML_NODES = 100_000  # a recipe has hundreds; aliases may not multiply it into a memory bomb
_NEST = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_UNNEST = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def safe_load_bounded(text: str) -> Any:
    """`yaml.safe_load`, refusing a document whose values, with every alias expanded, count more than
    MAX_YAML_NODES (a "billion laughs" recipe is small on disk and fills the memory once copied) or that
    refers to itself, or that nests more than MAX_DEPTH levels (PyYAML builds values by recursion).
    Raises ValueError, or yaml.YAMLError for a syntax error."""
    _check_depth(text)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(
    node: yaml.Node, seen: dict[int, tuple[int, int]], open_: set[int], path: str = ""
) -> tuple[int, int]:
    """The node count and the depth of `node` with aliases expanded (memoized: a shared node counts once per
    use). An alias names a node composed before it, so the recursion is no deeper than the text's nesting."""
    if id(node) in seen:
        return seen[id(node)]
    where = f"{path}: " if path else ""
    if id(node) in open_:
        raise ValueError(f"{where}an alias refers to a value that contains it")
    open_.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [
            (k, f"{path}.{k.value}" if isinstance(k, yaml.ScalarNode) else path) for k, _ in node.value
        ]
        children = [
            (child, p) for (k, v), (_, p) in zip(node.value, children, strict=True) for child in (k, v)
        ]
    elif isinstance(node, yaml.SequenceNode):
        children = [(child, f"{path}.{i}") for i, child in enumerate(node.value)]
    else:
        children = []
    counts = [_expanded_size(child, seen, open_, p.lstrip(".")) for child, p in children]
    size, depth = 1 + sum(n for n, _ in counts), 1 + max((d for _, d in counts), default=0)
    open_.discard(id(node))
    if size > MAX_YAML_NODES:
        raise ValueError(
            f"{where}expands to more than {MAX_YAML_NODES:,} values (YAML aliases multiply them)"
        )
    if depth > MAX_DEPTH + 1:  # a scalar counts as a level here
        raise ValueError(f"{where}nests more than {MAX_DEPTH} levels deep (YAML aliases add theirs)")
    seen[id(node)] = size, depth
    return size, depth


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH, found by PyYAML's event parser, which keeps its own stack."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, _NEST):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(
                    f"nests more than {MAX_DEPTH} levels deep at line {event.start_mark.line + 1}"
                )
        elif isinstance(event, _UNNEST):
            depth -= 1
