"""Policy files in: bounded reading, UTF-8 decoding, and YAML -> plain data with line/column.

Builds plain dicts/lists/scalars from ruamel.yaml's event stream with a loop, not recursion,
so deep nesting, alias bombs, duplicate keys and odd tags become messages, never tracebacks.
YAML 1.2 core schema only ('yes' is a string). Not the place for policy semantics (models.py).

Over 400 lines because the reader with positions and the one without must agree event for
event (load.py reads a valid file once, then again with positions only to report errors).
"""
from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml import events as ev
from ruamel.yaml.error import MarkedYAMLError, YAMLError

try:
    from _ruamel_yaml import CParser  # the C extension of ruamel.yaml.clib (libyaml)
    _HAVE_CLIB = True
except ImportError:
    _HAVE_CLIB = False

MAX_POLICY_BYTES = 16 << 20     # big address lists belong in set files, not in the YAML
MAX_SET_FILE_BYTES = 256 << 20  # 2M entries (NB_SET_CAP per family) with room for comments
MAX_DEPTH = 64                  # a policy is 6-7 levels deep; anything deeper is a mistake
MAX_NODES = 4_000_000           # counting what aliases expand to (billion-laughs guard)

Pos = tuple[int, int]          # (line, column), both 1-based
Loc = tuple[Any, ...]          # path into the data: mapping keys (str) and list indexes (int)


class NeedPositions(Exception):
    """A position was asked of a Document parsed without them (parse_yaml(positions=False))."""


class SourceError(Exception):
    """A file that cannot be read or parsed; .problems holds (line, col, message), line 0 = none."""

    def __init__(self, problems: list[tuple[int, int, str]]):
        self.problems = problems
        super().__init__("; ".join(p[2] for p in problems))


@dataclass
class Document:
    """A parsed YAML document: plain data plus where every value and mapping key starts
    (complete=False: only where each mapping and list starts)."""
    data: Any
    value_pos: dict[Loc, Pos] = field(default_factory=dict)
    key_pos: dict[Loc, Pos] = field(default_factory=dict)
    complete: bool = True

    def position(self, loc: Loc, key: bool = False) -> Pos:
        """Position of loc, or of its nearest ancestor the file spells out (1, 1 at worst).
        NeedPositions when this document was parsed without the one asked for."""
        if not self.complete and (key or loc not in self.value_pos):
            raise NeedPositions(loc)
        if key and loc in self.key_pos:
            return self.key_pos[loc]
        while loc:
            if loc in self.value_pos:
                return self.value_pos[loc]
            loc = loc[:-1]
        return self.value_pos.get((), (1, 1))


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most limit bytes; every failure is one SourceError line."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError([(0, 0, f"cannot read {what}: {e.strerror or e}")]) from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError([(0, 0, f"cannot read {what}: it is a directory")])
    if not stat.S_ISREG(st.st_mode):
        # FIFOs and devices could block forever or never end (/dev/zero).
        raise SourceError([(0, 0, f"cannot read {what}: not a regular file")])
    if st.st_size > limit:
        raise SourceError([(0, 0, f"{what} is {st.st_size} bytes; the limit is {limit} bytes"
                                  + (" (put large address lists in set files)"
                                     if what == "policy" else ""))])
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SourceError([(0, 0, f"cannot read {what}: {e.strerror or e}")]) from None
    if len(data) > limit:
        raise SourceError([(0, 0, f"{what} is larger than the limit of {limit} bytes")])
    return data


def read_stdin(limit: int) -> bytes:
    """The policy piped in ('netbpf validate -'), bounded like a file."""
    import sys

    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise SourceError([(0, 0, f"policy is larger than the limit of {limit} bytes")])
    return data


def decode_utf8(data: bytes) -> str:
    """UTF-8 (a BOM is allowed); a bad byte is reported at its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError([(line, col, f"not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                                       "save the file as UTF-8")]) from None


# YAML 1.2 core schema for plain (unquoted) scalars.
_NULL = {"", "~", "null", "Null", "NULL"}
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT_DEC = re.compile(r"[-+]?[0-9]+\Z")
_INT_OCT = re.compile(r"0o[0-7]+\Z")
_INT_HEX = re.compile(r"0x[0-9a-fA-F]+\Z")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z")
_FLOAT_SPECIAL = {".inf": float("inf"), ".Inf": float("inf"), ".INF": float("inf"),
                  "+.inf": float("inf"), "+.Inf": float("inf"), "+.INF": float("inf"),
                  "-.inf": float("-inf"), "-.Inf": float("-inf"), "-.INF": float("-inf"),
                  ".nan": float("nan"), ".NaN": float("nan"), ".NAN": float("nan")}
_MAX_INT_DIGITS = 1000          # below Python's int() digit limit; longer stays a string

_TAG = "tag:yaml.org,2002:"


def _plain_scalar(text: str) -> Any:
    if text in _NULL:
        return None
    if text in _BOOL:
        return _BOOL[text]
    if len(text) <= _MAX_INT_DIGITS:
        if _INT_DEC.match(text):
            return int(text)
        if _INT_OCT.match(text):
            return int(text[2:], 8)
        if _INT_HEX.match(text):
            return int(text[2:], 16)
    if text in _FLOAT_SPECIAL:
        return _FLOAT_SPECIAL[text]
    if _FLOAT.match(text):
        return float(text)
    return text


def _tagged_scalar(tag: str, text: str) -> Any:
    """A scalar with an explicit standard tag (!!str, !!int ...); ValueError when it does not fit."""
    kind = tag[len(_TAG):] if tag.startswith(_TAG) else None
    if kind == "str":
        return text
    value = _plain_scalar(text)
    wanted = {"int": int, "float": (int, float), "bool": bool, "null": type(None)}.get(kind or "")
    if wanted is None:
        raise ValueError(unsupported_tag(tag))
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, wanted):
        raise ValueError(f"'{text}' is not a valid !!{kind}")
    return float(value) if kind == "float" else value


def unsupported_tag(tag: str) -> str:
    shown = "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag
    return (f"unsupported YAML tag '{shown}'; quote values that start with '!' "
            f"(e.g. \"{shown}\")")


def _mark_pos(mark: Any) -> Pos:
    return (mark.line + 1, mark.column + 1)


class _Frame:
    __slots__ = ("value", "loc", "pending_key", "first_key_pos", "merged", "anchor", "nodes_at")

    def __init__(self, value: Any, loc: Loc, anchor: str | None, nodes_at: int):
        self.value = value
        self.loc = loc
        self.pending_key: tuple[str, Pos] | None = None
        self.first_key_pos: dict[str, Pos] = {}
        self.merged: set[str] = set()
        self.anchor = anchor
        self.nodes_at = nodes_at


def top_key(stack: list[_Frame]) -> str | None:
    """The key whose value is being read, when the innermost open node is a mapping."""
    if stack and isinstance(stack[-1].value, dict) and stack[-1].pending_key is not None:
        return stack[-1].pending_key[0]
    return None


class _Discard(dict):
    """Where positions go that a Document parsed without them does not keep."""

    def __setitem__(self, key, value) -> None:
        pass

    def setdefault(self, key, default=None):
        return default


def parse_yaml(text: str, positions: bool = True) -> Document:
    """Parse one YAML document into plain data with positions; SourceError lists what is wrong.

    Mapping keys are always strings: their text as written (so 'on:' and '80:' stay keys).
    libyaml parses when it is installed (about 10x faster on big policies); a document it
    rejects is parsed again by the pure-Python parser, whose messages say more (tabs...).
    positions=False records only where mappings and lists start (the fast path for a valid
    policy: fewer objects, less memory); errors are the same either way.
    """
    if _HAVE_CLIB:
        try:
            return _parse_yaml(text, pure=False, positions=positions)
        except SourceError:
            pass
    return _parse_yaml(text, pure=True, positions=positions)


def _parse_yaml(text: str, pure: bool, positions: bool = True) -> Document:
    problems: list[tuple[int, int, str]] = []
    doc = Document(data=None, complete=positions)
    key_pos = doc.key_pos if positions else _Discard()
    scalar_pos = doc.value_pos if positions else _Discard()
    stack: list[_Frame] = []
    anchors: dict[str, tuple[Any, int]] = {}
    nodes = 0
    documents = 0
    root_set = False

    def fatal(pos: Pos, msg: str) -> SourceError:
        return SourceError(problems + [(pos[0], pos[1], msg)])

    def attach(value: Any, pos: Pos) -> None:
        """Place a finished node into its parent (or as the document root)."""
        nonlocal root_set
        if not stack:
            doc.data = value
            root_set = True
            return
        top = stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
            return
        key, key_pos = top.pending_key
        top.pending_key = None
        mapping = top.value
        if key == "<<" and _merge(top, value, pos):
            return
        if key in mapping and key not in top.merged:
            first = top.first_key_pos.get(key, key_pos)
            problems.append((key_pos[0], key_pos[1],
                             f"duplicate key '{key}' (first at line {first[0]})"))
            return
        top.merged.discard(key)
        mapping[key] = value
        top.first_key_pos[key] = key_pos

    def _merge(top: _Frame, value: Any, pos: Pos) -> bool:
        """YAML merge key '<<': copy keys the mapping does not set itself."""
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(s, dict) for s in sources):
            return False
        for source in sources:
            for k, v in source.items():
                if k not in top.value:
                    top.value[k] = v
                    top.merged.add(k)
                    scalar_pos.setdefault(top.loc + (k,), pos)
                    key_pos.setdefault(top.loc + (k,), pos)
        return True

    def child_loc(pos: Pos, is_scalar: bool, text: str | None) -> Loc | None:
        """Loc of the node starting now; None when it is a mapping key (recorded as pending)."""
        if not stack:
            return ()
        top = stack[-1]
        if isinstance(top.value, list):
            return top.loc + (len(top.value),)
        if top.pending_key is None:
            if not is_scalar:
                raise fatal(pos, "mapping keys must be plain strings, not lists or mappings")
            key = text if text is not None else ""
            top.pending_key = (key, pos)
            if positions:
                key_pos.setdefault(top.loc + (key,), pos)
            return None
        return top.loc + (top.pending_key[0],)

    try:
        for event in _events(text, pure):
            if isinstance(event, ev.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise fatal(_mark_pos(event.start_mark),
                                "more than one YAML document ('---'); a policy is one document")
                continue
            if isinstance(event, (ev.StreamStartEvent, ev.StreamEndEvent, ev.DocumentEndEvent)):
                continue
            pos = _mark_pos(event.start_mark)
            if isinstance(event, (ev.MappingEndEvent, ev.SequenceEndEvent)):
                frame = stack.pop()
                count = nodes - frame.nodes_at
                if frame.anchor is not None:
                    anchors[frame.anchor] = (frame.value, count)
                attach(frame.value, pos)
                continue
            if isinstance(event, ev.AliasEvent):
                loc = child_loc(pos, False, None)
                if event.anchor not in anchors:
                    raise fatal(pos, f"unknown alias '*{event.anchor}'")
                value, count = anchors[event.anchor]
                nodes += count
                if nodes > MAX_NODES:
                    raise fatal(pos, f"aliases expand to more than {MAX_NODES} values")
                if loc is not None:
                    scalar_pos[loc] = pos
                    attach(value, pos)
                continue
            nodes += 1
            if nodes > MAX_NODES:
                raise fatal(pos, f"more than {MAX_NODES} values in one document")
            if isinstance(event, ev.ScalarEvent):
                plain = not event.style      # None (pure parser) or '' (libyaml): plain
                loc = child_loc(pos, True, event.value)
                if loc is None:
                    if event.anchor is not None:
                        anchors[event.anchor] = (event.value, 1)
                    continue
                if event.value == "" and plain and event.tag is None \
                        and top_key(stack) is not None:
                    # 'dport:' with nothing after it: the parser marks where the next token
                    # starts (often the next line); the key is where the mistake is.
                    pos = stack[-1].pending_key[1]
                scalar_pos[loc] = pos
                tag = event.tag
                if tag is not None and tag != "!":
                    try:
                        value = _tagged_scalar(tag, event.value)
                    except ValueError as e:
                        problems.append((pos[0], pos[1], str(e)))
                        value = event.value
                elif plain and tag is None:
                    value = _plain_scalar(event.value)
                else:
                    value = event.value
                if event.anchor is not None:
                    anchors[event.anchor] = (value, 1)
                attach(value, pos)
                continue
            # MappingStartEvent or SequenceStartEvent
            loc = child_loc(pos, False, None)
            assert loc is not None
            if len(stack) >= MAX_DEPTH:
                raise fatal(pos, f"nesting deeper than {MAX_DEPTH} levels")
            is_map = isinstance(event, ev.MappingStartEvent)
            tag = event.tag
            if tag is not None and tag != "!" and tag != _TAG + ("map" if is_map else "seq"):
                problems.append((pos[0], pos[1], unsupported_tag(tag)))
            doc.value_pos[loc] = pos
            stack.append(_Frame({} if is_map else [], loc, event.anchor, nodes))
    except SourceError:
        raise
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = _mark_pos(mark) if mark is not None else (0, 0)
        message = " ".join(str(x) for x in (e.context, e.problem) if x)
        # the parser's own words ('expected <block end>') mean nothing to a policy author
        message = next((plain for clue, plain in _SYNTAX_REWRITES if clue in message), message)
        message += next((hint for clue, hint in _SYNTAX_HINTS if clue in message), "")
        raise SourceError(problems + [(line, col, f"invalid YAML: {message}")]) from None
    except YAMLError as e:
        position = getattr(e, "position", None)
        line, col = _offset_pos(text, position) if isinstance(position, int) else (0, 0)
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        raise SourceError(problems + [(line, col, f"invalid YAML: {reason}")]) from None
    except RecursionError:
        raise SourceError(problems + [(0, 0, "invalid YAML: too deeply nested")]) from None
    if problems:
        raise SourceError(problems)
    if not root_set:
        raise SourceError([(1, 1, "the file is empty; a policy starts with 'version: 1'")])
    return doc


def _events(text: str, pure: bool):
    """YAML events. libyaml's parser is driven directly: ruamel's YAML.parse() wraps it in a
    loader whose per-event cost is about twice the parsing itself."""
    if pure:
        yield from YAML(typ="safe", pure=True).parse(io.StringIO(text))
        return
    parser = CParser(io.StringIO(text))
    try:
        while parser.check_event():
            yield parser.get_event()
    finally:
        parser.dispose()


_SYNTAX_HINTS = (
    ("'\\t'", " (indent with spaces, not tabs)"),
    ("scanning a tag", " (quote values that start with '!')"),
    ("mapping values are not allowed", " (check the indentation, or quote values containing "
                                       "': ' or ending in ':', such as IPv6 \"2001:db8::\")"),
)
_SYNTAX_REWRITES = (
    ("expected <block end>", "bad indentation: this line does not line up with the lines above "
                             "it (keys of one mapping, and the items of one list, start in the "
                             "same column)"),
    ("could not find expected ':'", "a key without ':' (or a quote left open) on the line "
                                    "before"),
)


def _offset_pos(text: str, offset: int) -> Pos:
    line = text.count("\n", 0, offset) + 1
    return (line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def format_path(loc: Loc) -> str:
    """('interfaces', 'eth0', 'ingress', 'rules', 2, 'dport') -> interfaces.eth0.ingress.rules[2].dport

    Keys that are not plain words (VLAN names like eth0.100) are quoted so the path stays readable.
    """
    out = ""
    for seg in loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif _PLAIN_KEY.match(str(seg)):
            out += f".{seg}" if out else str(seg)
        else:
            out += f"[{str(seg)!r}]"
    return out
