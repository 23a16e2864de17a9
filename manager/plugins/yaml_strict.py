"""plugin.yaml as YAML: a strict safe loader (no aliases, no duplicate keys), where each
key sits (line and column), and validation errors in plain words that name that place."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    """Safe loader that also refuses anchors/aliases (no billion-laughs expansion) and
    duplicate keys (`timeout: 5` then `timeout: 600` must not silently keep the last)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key; the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


PLAIN = {
    "missing": "is required",
    "int_type": "must be a whole number, without quotes",
    "int_parsing": "must be a whole number, without quotes",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "tuple_type": "must be a list",
    "model_type": "must be a mapping of keys",
    "greater_than": "must be greater than 0",
    "too_short": "needs at least one entry",
}
PATTERNS = {
    "name": "must be lowercase letters, digits and _, starting with a letter (at most 64)",
    "version": "must be a semantic version such as 1.0.0",
    "image": "must be an image name such as titan-runtime:py3.11",
    "topic": "must be 1-128 characters from A-Z a-z 0-9 . _ - and the globs * ? [ ]",
    "event_type": "must be 1-128 characters from A-Z a-z 0-9 . _ - and the globs * ? [ ]",
}


def format_error(err: Any, path: str, marks: dict[tuple[Any, ...], tuple[int, int]],
                 keys_at: Callable[[tuple[Any, ...]], list[str]]) -> str:
    """One pydantic error as `path:line:column: field: what is wrong`, in plain words,
    with "did you mean" for an unknown key (`keys_at` names the keys allowed there)."""
    loc = tuple(err["loc"])
    where = next((f"{path}:{line}:{col}: " for n in range(len(loc), -1, -1)
                  if (pos := marks.get(loc[:n])) for line, col in [pos]), f"{path}: ")
    field = ".".join(str(p) for p in loc) or "file"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), keys_at(loc[:-1]), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}{field}: unknown key (not allowed){hint}"
    if err["type"] == "string_pattern_mismatch" and str(loc[-1]) in PATTERNS:
        return f"{where}{field}: {PATTERNS[str(loc[-1])]}, got {err.get('input')!r:.60}"
    return f"{where}{field}: {plain(err)}"


def plain(err: Any) -> str:
    """A pydantic error's words without pydantic's wrapping ("Value error, ...")."""
    return PLAIN.get(err["type"]) or str(err["msg"]).removeprefix("Value error, ")


def positions(text: bytes) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Key path -> (line, column), 1-based, of every key and list item in the document."""
    marks: dict[tuple[Any, ...], tuple[int, int]] = {}
    try:
        root = yaml.compose(text, Loader=StrictLoader)
    except yaml.YAMLError:
        return marks

    def walk(node: Any, at: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            children = [(getattr(k, "value", None), k, v) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(n, item, item) for n, item in enumerate(node.value)]
        else:
            return
        for name, mark_node, value in children:
            marks[(*at, name)] = (mark_node.start_mark.line + 1, mark_node.start_mark.column + 1)
            walk(value, (*at, name))

    walk(root, ())
    return marks


def yaml_place(exc: yaml.YAMLError, path: str) -> str:
    """`path:line:column: ` of a YAML syntax error (the file, not PyYAML's "<byte string>")."""
    mark = getattr(exc, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}: " if mark else f"{path}: "


# PyYAML's words for the usual slips, and what to do about each
HINTS = (
    ("'\\t'", "indent with spaces: YAML does not allow tabs there"),
    ("mapping values are not allowed here", "a value that holds ': ' needs quotes, as in "
     "description: \"a: b\"; a key indented deeper than the line above is read as part of "
     "that line's value"),
    ("could not find expected ':'", "each line of a mapping is key: value"),
    ("did not find expected key", "the keys of one mapping line up; check the indentation"),
    ("expected <block end>", "the items of one list or mapping line up (check the "
     "indentation), and every quote opened is closed"),
    ("found unexpected end of stream", "a quote or bracket opened here is never closed"),
    ("expected ',' or ']'", "a [list] needs commas between items and its closing ']'"),
    ("expected ',' or '}'", "a {mapping} needs commas between items and its closing '}'"),
)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong, in PyYAML's words without its copy of the line, and a hint for the
    usual slips."""
    problem = getattr(exc, "problem", None)
    if problem is None:
        said = str(exc).split("\n", 1)[0]
    else:
        context = getattr(exc, "context", None)
        said = f"{problem} ({context})" if context else str(problem)
    hints = [hint for words, hint in HINTS if words in said]
    return f"{said}; hint: {hints[0]}" if hints else said
