"""No input gives a traceback: random bytes, random YAML, YAML-ish noise, deep nesting, huge
files and a wrong value in every field of a valid policy all end in PolicyError (or a valid
policy), and every error line points into the file.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from netbpf.errors import PolicyError
from netbpf.policy import load_policy

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
LINE = re.compile(r"^p\.yaml(:\d+:\d+)?: \S")
POLICIES = Path(__file__).resolve().parents[2] / "policies"


def check(tmp_path: Path, data: bytes) -> None:
    """load_policy either succeeds or raises PolicyError with well-formed lines; nothing else."""
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    try:
        load_policy(path)
    except PolicyError as e:
        assert e.errors
        display = str(path)
        for line in e.errors:
            assert LINE.match(line.replace(display, "p.yaml", 1)), line


def dump(value) -> bytes:
    out = io.BytesIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.dump(value, out)
    return out.getvalue()


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(
                        ["tcp", "udp", "icmp", "allow", "drop", "count", "@admins", "eth0",
                         "10.0.0.0/8", "2001:db8::/32", "80-90", "syn,!ack", "echo-request",
                         "auto", "nat", "dsr", "1", "version"]))
keys = st.one_of(st.text(max_size=10), st.sampled_from(
    ["version", "sets", "interfaces", "load_balancers", "eth0", "ingress", "egress", "rules",
     "name", "src", "dst", "proto", "dport", "sport", "action", "rate_limit", "pps", "file",
     "backends", "address", "vip", "port", "weight", "xdp", "mode", "tcp_flags", "icmp_type"]))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=30)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path, data):
    check(tmp_path, data)


@FUZZ
@given(doc=documents)
def test_random_yaml_documents(tmp_path, doc):
    check(tmp_path, dump(doc))


@FUZZ
@given(doc=st.dictionaries(keys, documents, max_size=4))
def test_random_documents_with_version_1(tmp_path, doc):
    check(tmp_path, dump({"version": 1, **doc}))


@FUZZ
@given(text=st.text(alphabet=" \t\n:-[]{}!&*#|>'\"%@`,?~.0123456789abcxyz\\\r\u00e9\x00",
                    max_size=200))
def test_yaml_punctuation_noise(tmp_path, text):
    check(tmp_path, ("version: 1\n" + text).encode())


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


WRONG = [None, True, -1, 70000, 1.5, "", "x", "@nosuch", "10.0.0.1/33", [], {"a": 1}, [1],
         2 ** 70]


@pytest.mark.parametrize("example", ["firewall.yaml", "lb.yaml", "demo.yaml"])
def test_wrong_value_in_every_field_of_a_valid_policy(tmp_path, example):
    yaml = YAML(typ="safe", pure=True)
    base = yaml.load((POLICIES / example).read_text())
    for path in list(_paths(base))[1:]:
        for wrong in WRONG:
            # JSON is YAML 1.2 and far quicker to write than block YAML.
            check(tmp_path, json.dumps(_replaced(base, path, wrong)).encode())


@pytest.mark.parametrize("text", [
    "version: 1\nx: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "version: 1\nx: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
    "version: 1\nx:\n" + "".join("  " * i + "- \n" for i in range(1, 3000)),
    "[" * 100_000,
], ids=["flow_lists", "flow_mappings", "block_lists", "unclosed"])
def test_deep_nesting_is_an_error_not_a_crash(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert len(info.value.errors) == 1


def test_alias_bomb_is_stopped(tmp_path):
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError, match="aliases expand to more than"):
        load_policy(path)


def test_huge_policy_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "p.yaml"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(PolicyError, match=r"policy is 67108864 bytes; the limit is \d+ bytes"):
        load_policy(path)


def test_many_errors_in_a_large_file_are_all_reported(tmp_path):
    text = "version: 1\ninterfaces:\n  eth0:\n    ingress:\n      rules:\n" + "".join(
        f"        - {{name: r{i}, proto: tcp, dport: {70000 + i}, action: drop}}\n"
        for i in range(5000))
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert len(info.value.errors) == 5000


def test_set_file_of_garbage_reports_a_bounded_number_of_lines(tmp_path):
    (tmp_path / "bl.txt").write_bytes(b"\n".join(b"junk%d" % i for i in range(100_000)))
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nsets:\n  bl: {file: bl.txt}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert len(info.value.errors) == 21
    assert info.value.errors[-1].endswith("... and 99980 more bad lines")


@pytest.mark.parametrize("target", ["dir", "fifo", "binary", "utf16"])
def test_odd_set_files(tmp_path, target):
    import os
    place = tmp_path / "set"
    if target == "dir":
        place.mkdir()
    elif target == "fifo":
        os.mkfifo(place)
    elif target == "binary":
        place.write_bytes(bytes(range(256)))
    else:
        place.write_text("10.0.0.0/8\n", encoding="utf-16")
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nsets:\n  s: {file: set}\n")
    with pytest.raises(PolicyError):
        load_policy(path)


@pytest.mark.parametrize("target", ["directory", "fifo"])
def test_odd_policy_paths(tmp_path, target):
    import os
    place = tmp_path / "p.yaml"
    if target == "directory":
        place.mkdir()
    else:
        os.mkfifo(place)
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(place)
