"""load_policy(): policy file -> models -> cross-checks -> IR, or PolicyError with every problem.

Each problem reads 'FILE:LINE:COL: path.to.field: message' (columns 1-based), pointing at the
offending key or value; set file lines are reported in the set file. Also the policy hash and
the one-line summary. Not the language itself (models.py) nor the checks (checks.py).
A little over 400 lines: the two passes (without, then with positions) and the placing of
pydantic's errors share the report and are clearer side by side.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from netbpf.policy import inputs
from netbpf.errors import PolicyError
from netbpf.policy.inputs import add_set_file
from netbpf.policy.ir import PolicyIR, RuleIR
from netbpf.policy import models
from netbpf.policy.addr import parse_hosts_v4, parse_set_text
from netbpf.policy.checks import PolicyView, check_policy, view_of_data, view_of_model
from netbpf.policy.convert import policy_to_ir
from netbpf.policy.models import Policy, SetFile, describe
from netbpf.policy.shadow import covering_entries, find_shadowed
from netbpf.policy.source import (MAX_POLICY_BYTES, MAX_SET_FILE_BYTES, Document, Loc,
                                  NeedPositions, read_stdin,
                                  SourceError, decode_utf8, format_path, parse_yaml, read_bytes)

MAX_BAD_SET_LINES = 20  # per set file; a wrong file can have a million bad lines


@dataclass
class LoadedPolicy:
    """A valid policy: the models, their IR, warnings and a hash of every input byte."""
    path: Path
    display: str                 # the path as the user gave it, used in every message
    model: Policy
    ir: PolicyIR
    warnings: list[str] = field(default_factory=list)
    source_hash: str = ""        # sha256 over the policy file and every set file it names
    raw: bytes = b""             # the policy file's bytes (kept for `netbpf restore`)
    set_files: list[str] = field(default_factory=list)   # as named, in hashing order
    set_paths: list[Path] = field(default_factory=list)  # the set files read, as paths

    def summary(self) -> str:
        ir = self.ir
        ingress = sum(len(i.ingress.rules) for i in ir.interfaces.values() if i.ingress)
        egress = sum(len(i.egress.rules) for i in ir.interfaces.values() if i.egress)
        parts = [_plural(len(ir.interfaces), "interface")]
        if ir.interfaces:
            parts.append(f"{_plural(ingress + egress, 'rule')} ({ingress} ingress, "
                         f"{egress} egress)")
        sets = [f"{s.name} {len(s.v4) + len(s.v6)}" for s in ir.sets.values()]
        if len(sets) > 6:
            sets = sets[:5] + [f"{len(sets) - 5} more"]
        parts.append(_plural(len(ir.sets), "set") + (f" ({', '.join(sets)})" if sets else ""))
        parts.append(_plural(len(ir.load_balancers), "load balancer"))
        if ir.load_balancers:
            parts.append(_plural(sum(len(lb.backends) for lb in ir.load_balancers.values()),
                                 "backend"))
        text = f"{self.display}: ok — {', '.join(parts)}"
        if self.warnings:
            text += f" ({_plural(len(self.warnings), 'warning')})"
        return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Report:
    """Collects problems, placed using the document's positions: as formatted lines for
    people and as records (file, line, column, path, message) for --json."""

    def __init__(self, display: str, doc: Document | None):
        self.display = display
        self.doc = doc
        self.lines: list[tuple[tuple, str, dict]] = []

    def at(self, loc: Loc, message: str, key: bool = False) -> None:
        line, col = self.doc.position(loc, key) if self.doc else (1, 1)
        path = format_path(loc)
        text = f"{self.display}:{line}:{col}: " + (f"{path}: " if path else "") + message
        self.lines.append(((0, self.display, line, col), text,
                           _problem(self.display, line, col, path, message)))

    def in_file(self, display: str, line: int, col: int, message: str) -> None:
        where = f"{display}:{line}:{col}:" if line else f"{display}:"
        self.lines.append(((1 if display != self.display else 0, display, line, col),
                           f"{where} {message}", _problem(display, line, col, "", message)))

    def sorted(self) -> list[str]:
        return list(dict.fromkeys(text for _, text, _ in sorted(self.lines, key=lambda x: x[0])))

    def error(self) -> PolicyError:
        records = {}
        for _, text, rec in sorted(self.lines, key=lambda x: x[0]):
            records.setdefault(text, rec)
        return PolicyError(list(records), list(records.values()))


def _problem(file: str, line: int, col: int, path: str, message: str) -> dict:
    return {"file": file, "line": line or None, "column": col or None, "path": path or None,
            "message": message}


class _Digest:
    """netbpf.policy.inputs' fingerprint, remembering which set files went into it."""

    def __init__(self, policy_bytes: bytes):
        self._h = inputs.start(policy_bytes)
        self.files: list[str] = []

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


STDIN = "-"


def load_policy(path: str | Path, root: Path | None = None) -> LoadedPolicy:
    """Read, validate and convert a policy file ('-': standard input, set files relative to
    the working directory); PolicyError holds every problem found. root, when given, is where
    absolute set-file paths are looked up (a saved copy of the file system, see persist.py).

    A valid policy is read once without most positions (faster, less memory); when anything
    is to be reported (an error or a warning) it is read again with every position, so each
    message points at its exact line and column."""
    stdin = str(path) == STDIN
    display = "<stdin>" if stdin else str(path)
    path = Path(path)
    report = _Report(display, None)
    try:
        raw = read_stdin(MAX_POLICY_BYTES) if stdin else \
            read_bytes(path, MAX_POLICY_BYTES, "policy")
        text = decode_utf8(raw)
    except SourceError as e:
        for line, col, msg in e.problems:
            report.in_file(display, line, col, msg)
        raise report.error() from None
    sets_read: dict[Path, tuple] = {}
    try:
        return _load(path, display, stdin, raw, text, root, sets_read, positions=False)
    except NeedPositions:
        return _load(path, display, stdin, raw, text, root, sets_read, positions=True)


def _load(path: Path, display: str, stdin: bool, raw: bytes, text: str, root: Path | None,
          sets_read: dict, positions: bool) -> LoadedPolicy:
    """One pass of load_policy; without positions, NeedPositions instead of any message."""
    report = _Report(display, None)
    try:
        doc = parse_yaml(text, positions=positions)
    except SourceError as e:
        for line, col, msg in e.problems:
            report.in_file(display, line, col, msg)
        raise report.error() from None
    report.doc = doc
    if doc.data is None:
        report.in_file(display, 1, 1, "the file is empty; a policy starts with 'version: 1'")
        raise report.error()
    if not isinstance(doc.data, dict):
        report.at((), f"a policy must be a mapping starting with 'version: 1' "
                      f"(got {describe(doc.data)})")
        raise report.error()

    # Top-level 'x-' keys are ignored, as in docker-compose: a home for YAML anchors.
    data = {k: v for k, v in doc.data.items() if not k.startswith("x-")}
    model: Policy | None = None
    try:
        model = Policy.model_validate(data, context={"netbpf_defer_checks": True})
    except ValidationError as e:
        if not positions:
            raise NeedPositions() from None
        _report_validation(report, e, data)
    view = view_of_model(model) if model is not None else view_of_data(data)

    digest = _Digest(raw)
    # set files are relative to the policy itself, also when it was reached through a symlink
    base_dir = Path.cwd() if stdin else path.resolve().parent
    set_paths = _read_set_files(view, base_dir, display, report, digest, root, sets_read)
    if report.lines and not positions:
        raise NeedPositions()

    def line_of(loc: Loc) -> int:
        return doc.position(loc)[0]

    errors, warnings = check_policy(view, line_of)
    if errors and not positions:
        raise NeedPositions()
    for loc, msg in errors:
        report.at(loc, msg)
    if report.lines or model is None:
        raise report.error()

    for dv in view.directions:
        for index, rule in dv.rules:
            rule._line = line_of(dv.loc + ("rules", index))
    ir = policy_to_ir(model, base_dir)
    notes = _Report(display, doc)
    for loc, msg in warnings:
        notes.at(loc, msg)
    # warnings point at rules and other mappings, whose starts even a parse without positions
    # keeps; one pointing elsewhere raises NeedPositions from doc.position (a second pass)
    _shadow_warnings(ir, notes)
    return LoadedPolicy(path=path, display=display, model=model, ir=ir,
                        warnings=notes.sorted(), source_hash=digest.hexdigest(), raw=raw,
                        set_files=digest.files, set_paths=set_paths)


def _shadow_warnings(ir: PolicyIR, notes: _Report) -> None:
    for ifname, iface in ir.interfaces.items():
        for direction in ("ingress", "egress"):
            d = getattr(iface, direction)
            if d is None:
                continue
            # A file rule lowered to several IR rules (ct: invalid) is shadowed only when all
            # of them are; messages name file rules by their index in the file.
            parts: dict[int, int] = {}
            first: dict[int, RuleIR] = {}          # file rule -> its first IR rule
            for j, r in enumerate(d.rules):
                key = r.source_index if r.source_index is not None else j
                parts[key] = parts.get(key, 0) + 1
                first.setdefault(key, r)
            hits: dict[int, list[int]] = {}
            for j, i in find_shadowed(d.rules, ir.sets):
                key = d.rules[j].source_index
                hits.setdefault(j if key is None else key, []).append(i)
            for key, bys in sorted(hits.items()):
                if len(bys) < parts[key]:
                    continue
                shadowed = first[key]
                by = d.rules[bys[0]]
                through = covering_entries(by, shadowed, ir.sets)
                via = f" (through {', '.join(through)})" if through else ""
                notes.at(("interfaces", ifname, direction, "rules", key),
                         f"rule '{shadowed.name}' is shadowed by rule '{by.name}' "
                         f"(line {by.line}){via} and can never match")


# ---- set files -----------------------------------------------------------------------------

def _set_file_display(policy_display: str, file: str) -> str:
    if os.path.isabs(file):
        return file
    return os.path.normpath(os.path.join(os.path.dirname(policy_display), file))


def _read_set_files(view: PolicyView, base_dir: Path, display: str, report: _Report,
                    digest: Any, root: Path | None = None,
                    read: dict | None = None) -> list[Path]:
    """Read every set file named by a valid set; entries land on the SetFile models.
    Returns the files read."""
    cache: dict[Path, tuple[list, list] | None] = {}
    for name, s in view.sets.items():
        spec = s.spec
        if not isinstance(spec, SetFile):
            continue
        if root is not None and os.path.isabs(spec.file):
            target = root / spec.file.lstrip("/")
        else:
            target = base_dir / spec.file
        spec._path = _set_file_display(display, spec.file)
        if target not in cache:   # two sets may share a file: read and report it once
            cache[target] = _read_set_file(spec, target, s.loc, report, digest, read)
        spec._entries = cache[target]
    return list(cache)


def _read_set_file(spec: SetFile, target: Path, loc: Loc, report: _Report,
                   digest: Any, read: dict | None = None) -> tuple[list, list] | None:
    """read: files an earlier pass of the same load read without a problem (bytes, entries)."""
    if read is not None and target in read:
        data, entries, spec._plain = read[target]
        spec._sha = hashlib.sha256(data).hexdigest()
        add_set_file(digest, spec.file, data)
        digest.files.append(spec.file)
        return entries
    try:
        data = read_bytes(target, MAX_SET_FILE_BYTES, f"set file '{spec.file}'")
        text = decode_utf8(data)
    except SourceError as e:
        line, col, msg = e.problems[0]
        if line:
            report.in_file(spec._path, line, col, f"{format_path(loc)}: {msg}")
        else:
            report.at(loc + ("file",), msg)
        return None
    add_set_file(digest, spec.file, data)
    digest.files.append(spec.file)
    spec._sha = hashlib.sha256(data).hexdigest()
    hosts = parse_hosts_v4(text)
    # unique lines too: then a line is an entry and an entry a line
    spec._plain = hosts is not None and \
        len(hosts[0]) == text.count("\n") + (not text.endswith("\n"))
    v4, v6, bad = hosts or parse_set_text(text)
    where = format_path(loc)
    for lineno, msg in bad[:MAX_BAD_SET_LINES]:
        report.in_file(spec._path, lineno, 1, f"{where}: {msg}")
    if len(bad) > MAX_BAD_SET_LINES:
        report.in_file(spec._path, bad[MAX_BAD_SET_LINES][0], 1,
                       f"{where}: ... and {len(bad) - MAX_BAD_SET_LINES} more bad lines")
    if read is not None and not bad:
        read[target] = (data, (v4, v6), spec._plain)
    return v4, v6


def read_set_file(spec: SetFile, base_dir: Path, name: str) -> None:
    """Fill spec's entries from its file, for models not built by load_policy."""
    spec._path = str(base_dir / spec.file)
    report = _Report(spec._path, None)
    spec._entries = _read_set_file(spec, base_dir / spec.file, ("sets", name), report,
                                   _Digest(b""))
    if report.lines:
        raise report.error()


# ---- pydantic errors -> positions and messages ---------------------------------------------

def _report_validation(report: _Report, error: ValidationError, data: Any) -> None:
    for err in error.errors(include_url=False):
        kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
        if kind == "netbpf_multi":
            for at, msg in ctx["problems"]:
                _place(report, data, loc + tuple(at), kind, msg)
        elif kind == "netbpf":
            # Discriminator errors carry no ctx: their text is in msg, without the value.
            msg = ctx.get("msg") or f"{err['msg']} (got {describe(err.get('input'))})"
            _place(report, data, loc + tuple(ctx.get("at", ())), kind, msg)
        else:
            _place(report, data, loc, kind, None, err)


def _place(report: _Report, data: Any, loc: Loc, kind: str, msg: str | None,
           err: dict | None = None) -> None:
    """Map a pydantic loc onto the document and report it there.

    Pydantic locs carry extra segments (union tags, '[key]'): walk the data and keep only the
    segments that exist in the file; a missing field is placed on its parent mapping.
    """
    path: list[Any] = []
    node = data
    is_key = kind == "extra_forbidden"
    segments = list(loc)
    for n, seg in enumerate(segments):
        if seg == "[key]":
            is_key = True
            break
        if isinstance(node, dict) and isinstance(seg, str) and seg in node:
            path.append(seg)
            node = node[seg]
        elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
            path.append(seg)
            node = node[seg]
        elif kind == "missing" and n == len(segments) - 1:
            missing = seg
            report.at(tuple(path), msg or _missing_message(tuple(path), missing))
            return
    if msg is None:
        msg = _message(tuple(path), kind, err or {})
    report.at(tuple(path), msg, key=is_key)


def _missing_message(parent: Loc, key: Any) -> str:
    if parent == () and key == "version":
        return "missing required key 'version' (add 'version: 1' at the top)"
    return f"missing required key '{key}'"


def _all_keys() -> list[str]:
    keys: set[str] = set()
    for obj in vars(models).values():
        if isinstance(obj, type) and issubclass(obj, models.StrictModel):
            keys.update(obj.model_fields)
    return sorted(keys)


_KNOWN_KEYS = _all_keys()


def _is_network(text: str) -> bool:
    from netbpf.policy.addr import AddrError, parse_network

    try:
        parse_network(text)
    except (AddrError, ValueError):
        return False
    return True


def _closest(key: str) -> str | None:
    """The known key a typo most likely meant; swapped letters ('dprot') beat other edits."""
    close = difflib.get_close_matches(key, _KNOWN_KEYS, n=3, cutoff=0.7)
    same_letters = [k for k in close if sorted(k) == sorted(key)]
    return (same_letters or close or [None])[0]


def _message(path: Loc, kind: str, err: dict) -> str:
    value = err.get("input")
    if kind == "extra_forbidden":
        key = path[-1] if path else "?"
        if key in ("rules", "default") and len(path) == 3 and path[0] == "interfaces":
            return f"unknown key '{key}': it goes under 'ingress:' or 'egress:'"
        if "timeouts" in path:
            known = ", ".join(models.ConntrackTimeouts.model_fields)
            return (f"unknown key '{key}': conntrack timeouts are per protocol and state: "
                    f"{known} (e.g. timeouts: {{tcp_established: 5}})")
        if _is_network(str(key)):
            return (f"unknown key '{key}': in a {{...}} mapping a comma ends a value, so this "
                    f"address stood alone; write the addresses as a list, e.g. "
                    f"src: [10.0.0.0/8, {key}]")
        close = _closest(str(key))
        if close == key:
            close = None
        return f"unknown key '{key}'" + (f" (did you mean '{close}'?)" if close else "")
    if value is None and kind in ("model_type", "dict_type", "list_type", "string_type",
                                  "int_type", "bool_type", "model_attributes_type"):
        return "has no value; give one or remove the key"
    expected = {"model_type": "a mapping", "dict_type": "a mapping",
                "model_attributes_type": "a mapping", "list_type": "a list",
                "string_type": "a string", "int_type": "an integer",
                "bool_type": "true or false", "float_type": "a number"}.get(kind)
    if expected:
        if path == ():
            return f"a policy must be a mapping starting with 'version: 1' (got {describe(value)})"
        return f"must be {expected} (got {describe(value)})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return "must not be empty"
    text = str(err.get("msg", kind))
    return text[:1].lower() + text[1:]
