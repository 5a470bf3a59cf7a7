"""Pydantic v2 models of the policy file: types, defaults, per-object checks, JSON Schema text.

Strict: unknown keys, wrong types and nulls are errors, values are normalised (ports to ranges,
addresses to integers). Checks across objects live in checks.py, YAML and file I/O in load.py.
Custom errors carry ctx 'at' (a sub-path) or 'problems' (several sub-paths) for load.py to place.

Over 400 lines because every model of the language is here with its field documentation:
`netbpf schema` and editors' completion are generated from this one file.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PlainSerializer,
                      PlainValidator, PrivateAttr, Tag, WithJsonSchema, model_validator)
from pydantic_core import PydanticCustomError

from netbpf.policy.ir import AddrMatch, Prefix
from netbpf.lb.maglev import is_prime
from netbpf.policy import vocab
from netbpf.policy.addr import AddrError, format_address, format_prefix, parse_address, parse_network

Problem = tuple[tuple[Any, ...], str]   # (sub-path below the object, message)


def fail(msg: str, at: tuple[Any, ...] = ()) -> PydanticCustomError:
    # The message goes through ctx, not the template: messages may contain braces.
    return PydanticCustomError("netbpf", "{msg}", {"msg": msg, "at": at})


def fail_all(problems: list[Problem]) -> PydanticCustomError:
    if len(problems) == 1:
        return fail(problems[0][1], problems[0][0])
    return PydanticCustomError("netbpf_multi", "{msg}",
                               {"msg": "; ".join(m for _, m in problems), "problems": problems})


def describe(value: Any) -> str:
    """A value as it would look in the YAML file, short enough for a one-line message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _nullable(to_yaml: Any) -> Any:
    """A serializer for an optional field: None stays None."""
    return lambda value: None if value is None else to_yaml(value)


def _no_null(value: Any) -> None:
    # 'dport:' with nothing after it parses as null; treating that as 'any port' would
    # silently widen a firewall rule, so an explicit null is always an error.
    if value is None:
        raise fail("has no value; give one or remove the key")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- scalar types -------------------------------------------------------------------------

def int_range(lo: int, hi: int) -> Any:
    """An integer in [lo, hi] with the message 'must be lo-hi (got x)'."""
    def check(value: Any) -> int:
        _no_null(value)
        if not _is_int(value):
            raise fail(f"must be an integer (got {describe(value)})")
        if not lo <= value <= hi:
            raise fail(f"must be {lo}-{hi} (got {value})")
        return value
    return Annotated[int, PlainValidator(check),
                     WithJsonSchema({"type": "integer", "minimum": lo, "maximum": hi})]


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


def _check_name(value: Any) -> str:
    _no_null(value)
    if not isinstance(value, str):
        raise fail(f"must be a string (got {describe(value)})")
    if not NAME_RE.match(value):
        raise fail(f"{describe(value)} is not a valid name: use 1-63 letters, digits, '_', '.' "
                   "or '-', starting with a letter or digit")
    return value


Name = Annotated[str, PlainValidator(_check_name), WithJsonSchema(
    {"type": "string", "pattern": "^" + NAME_RE.pattern.removesuffix(r"\Z") + "$",
     "description": "1-63 letters, digits, '_', '.', '-'; starts with a letter or digit"})]


def _check_ifname(value: Any) -> str:
    """Linux dev_valid_name(): 1-15 bytes, not '.' or '..', no '/', ':' or whitespace."""
    _no_null(value)
    if not isinstance(value, str):
        raise fail(f"must be a string (got {describe(value)})")
    size = len(value.encode())
    if not 1 <= size <= 15 or value in (".", "..") or \
            any(c in "/:\0" or c.isspace() for c in value):
        too_long = f" ({size} bytes)" if size > 15 else ""
        raise fail(f"{describe(value)} is not a valid interface name{too_long}: Linux names "
                   "are 1-15 characters without '/', ':' or whitespace")
    return value


IfName = Annotated[str, PlainValidator(_check_ifname), WithJsonSchema(
    {"type": "string", "minLength": 1, "maxLength": 15, "pattern": r"^[^/:\s]+$",
     "description": "Linux interface name: 1-15 characters, no '/', ':' or whitespace"})]


def _got(value: Any) -> str:
    """'got a mapping', plus the likely cause when YAML turned an unquoted IPv6 address
    ending in ':' ('2001:db8::') into a key."""
    if isinstance(value, dict) and len(value) == 1:
        key, val = next(iter(value.items()))
        if val is None and isinstance(key, str) and ":" in key:
            return (f"got a mapping: YAML read the unquoted IPv6 address '{key}:' as a key; "
                    f"quote it: \"{key}:\"")
    return f"got {describe(value)}"


def _check_address(value: Any) -> tuple[int, int]:
    _no_null(value)
    if not isinstance(value, str):
        raise fail(f"must be an IPv4 or IPv6 address ({_got(value)})")
    try:
        return parse_address(value)
    except AddrError as e:
        raise fail(str(e)) from None


Address = Annotated[
    tuple[int, int], PlainValidator(_check_address),
    PlainSerializer(_nullable(lambda a: format_address(*a))),
    WithJsonSchema({"type": "string", "description": "an IPv4 or IPv6 address",
                    "examples": ["10.0.0.100", "2001:db8::100"]})]


def _check_ports(value: Any) -> tuple[tuple[int, int], ...]:
    _no_null(value)
    if isinstance(value, dict):
        # {not: ...}: the complement ranges; stored as such, so compiler and shadowing need
        # nothing new (ports are a 16-bit space: the complement has at most n + 1 ranges)
        inner = _negated(value)
        complement = complement_ranges(_check_ports(inner))
        if not complement:
            raise fail("{not: ...} of every port matches no port")
        return complement
    items = value if isinstance(value, list) else [value]
    if not items:
        raise fail("must not be empty; remove the key to match any port")
    ranges: list[tuple[int, int]] = []
    problems: list[Problem] = []
    for i, item in enumerate(items):
        at = (i,) if isinstance(value, list) else ()
        try:
            ranges.append(_port_range(item))
        except ValueError as e:
            problems.append((at, str(e)))
    if problems:
        raise fail_all(problems)
    return merge_ranges(ranges)


def _port_range(item: Any) -> tuple[int, int]:
    if _is_int(item):
        lo = hi = item
    elif isinstance(item, str):
        lo_text, dash, hi_text = item.strip().partition("-")
        texts = (lo_text.strip(), hi_text.strip()) if dash else (lo_text.strip(),) * 2
        if not all(t.isascii() and t.isdigit() and len(t) <= 6 for t in texts):
            raise ValueError(f"{describe(item)} is not a port or a 'lo-hi' port range")
        lo, hi = int(texts[0]), int(texts[1])
    else:
        raise ValueError("must be a port, a 'lo-hi' range or a list of them "
                         f"(got {describe(item)})")
    for port in (lo, hi):
        if not 0 <= port <= 65535:
            raise ValueError(f"must be 0-65535 (got {port})")
    if lo > hi:
        raise ValueError(f"{describe(item)}: range start {lo} is above its end {hi}")
    return lo, hi


def merge_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, with overlapping and adjacent ranges joined: one canonical form per port set."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def complement_ranges(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= 65535:
        out.append((start, 65535))
    return tuple(out)


def _negated(value: dict) -> Any:
    if set(value) != {"not"}:
        raise fail("a mapping here negates a match: write {not: VALUE} "
                   f"(got keys {', '.join(map(str, value))})")
    if isinstance(value["not"], dict):
        raise fail("{not: {not: ...}} : negate once")
    _no_null(value["not"])
    return value["not"]


def _ports_yaml(ranges: tuple[tuple[int, int], ...]) -> list[Any]:
    return [lo if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]


_PORT_ITEM = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 65535},
                        {"type": "string", "pattern": r"^\d+(-\d+)?$"}]}
_PORTS = {"anyOf": [_PORT_ITEM, {"type": "array", "items": _PORT_ITEM, "minItems": 1}]}
Ports = Annotated[
    tuple[tuple[int, int], ...], PlainValidator(_check_ports),
    PlainSerializer(_nullable(_ports_yaml)),
    WithJsonSchema({"anyOf": [*_PORTS["anyOf"], {
        "type": "object", "properties": {"not": _PORTS}, "required": ["not"],
        "additionalProperties": False, "description": "every port but these"}],
                    "examples": [22, "8000-8100", [80, 443]]})]


def _check_addr_match(value: Any) -> AddrMatch:
    _no_null(value)
    if isinstance(value, dict):
        inner = _check_addr_match(_negated(value))
        return AddrMatch(prefixes=inner.prefixes, set_name=inner.set_name, negated=True)
    if isinstance(value, str) and value.startswith("@"):
        return AddrMatch(set_name=_check_set_ref(value))
    items = value if isinstance(value, list) else [value]
    if not items:
        raise fail("must not be empty; remove the key to match any address")
    prefixes: list[Prefix] = []
    problems: list[Problem] = []
    for i, item in enumerate(items):
        at = (i,) if isinstance(value, list) else ()
        if isinstance(item, str) and item.startswith("@"):
            problems.append((at, f"a set reference must stand alone (write '{item}' "
                                 "instead of a list)"))
        elif not isinstance(item, str):
            problems.append((at, "must be an address, a network, a list of them or '@set' "
                                 f"({_got(item)})"))
        else:
            try:
                prefixes.append(Prefix(*parse_network(item)))
            except AddrError as e:
                problems.append((at, str(e)))
    if problems:
        raise fail_all(problems)
    return AddrMatch(prefixes=tuple(dict.fromkeys(prefixes)))


def _check_set_ref(text: str) -> str:
    name = text[1:]
    if not NAME_RE.match(name):
        raise fail(f"{describe(text)} is not a valid set reference: '@' then a set name")
    return name


def _addr_match_yaml(match: AddrMatch) -> Any:
    if match.set_name is not None:
        text: Any = "@" + match.set_name
    else:
        text = [format_prefix(p.family, p.addr, p.plen) for p in match.prefixes]
    return {"not": text} if match.negated else text


_ADDR_ITEM = {"type": "string", "description": "IPv4/IPv6 address or network in CIDR form"}
AddrSpec = Annotated[
    AddrMatch, PlainValidator(_check_addr_match),
    PlainSerializer(_nullable(_addr_match_yaml)),
    WithJsonSchema({"anyOf": [
        {"type": "string", "pattern": "^@", "description": "'@' and the name of a set"},
        _ADDR_ITEM, {"type": "array", "items": _ADDR_ITEM, "minItems": 1},
        {"type": "object", "required": ["not"], "additionalProperties": False,
         "description": "every address but these (of their families), or not in the set"}],
        "examples": ["10.0.0.0/8", ["192.0.2.1", "2001:db8::/32"], "@admins"]})]


def _check_proto(value: Any) -> int | None:
    _no_null(value)
    if isinstance(value, str):
        name = value.lower()
        if name == "any":
            return None
        if name in vocab.PROTOCOLS:
            return vocab.PROTOCOLS[name]
        raise fail(f"unknown protocol {describe(value)}: use "
                   f"{', '.join(vocab.PROTOCOLS)}, any, or a number 0-255")
    if _is_int(value):
        if not 0 <= value <= 255:
            raise fail(f"protocol number must be 0-255 (got {value})")
        return value
    raise fail(f"must be a protocol name or number (got {describe(value)})")


Proto = Annotated[
    Union[int, None], PlainValidator(_check_proto),
    PlainSerializer(vocab.proto_name),
    WithJsonSchema({"anyOf": [{"enum": [*vocab.PROTOCOLS, "any"]},
                              {"type": "integer", "minimum": 0, "maximum": 255}]})]


def _check_icmp_type(value: Any) -> int | str:
    _no_null(value)
    if _is_int(value):
        if not 0 <= value <= 255:
            raise fail(f"must be 0-255 (got {value})")
        return value
    if isinstance(value, str):
        name = vocab.ICMP_ALIASES.get(value.lower(), value.lower())
        if name in vocab.ICMP_TYPES or name in vocab.ICMPV6_TYPES:
            return name
        raise fail(f"unknown ICMP type {describe(value)}: use a number 0-255 or a name "
                   f"({', '.join(sorted(set(vocab.ICMP_TYPES) | set(vocab.ICMPV6_TYPES)))})")
    raise fail(f"must be an ICMP type name or number (got {describe(value)})")


IcmpType = Annotated[
    Union[int, str], PlainValidator(_check_icmp_type),
    WithJsonSchema({"anyOf": [
        {"enum": sorted(set(vocab.ICMP_TYPES) | set(vocab.ICMPV6_TYPES)
                        | set(vocab.ICMP_ALIASES))},
        {"type": "integer", "minimum": 0, "maximum": 255}]})]

_FLAG_NAMES = ", ".join(vocab.TCP_FLAGS)


def _check_tcp_flags(value: Any) -> tuple[int, int]:
    _no_null(value)
    if isinstance(value, dict):
        tokens = []
        for flag, is_set in value.items():
            if not isinstance(is_set, bool):
                raise fail(f"must be true (set) or false (clear) (got {describe(is_set)})",
                           (flag,))
            tokens.append(flag if is_set else "!" + flag)
    elif isinstance(value, str):
        tokens = value.replace(",", " ").split()
    elif isinstance(value, list):
        tokens = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise fail(f"must be a flag name (got {describe(item)})", (i,))
            tokens.extend(item.replace(",", " ").split())
    else:
        raise fail(f"must be a string like 'syn,!ack', a list or a mapping (got {describe(value)})")
    if not tokens:
        raise fail("names no flags; remove the key to match any flags")
    mask = bits = 0
    for token in tokens:
        clear = token.startswith("!")
        name = token[1:].lower() if clear else token.lower()
        if name not in vocab.TCP_FLAGS:
            raise fail(f"unknown TCP flag {describe(name)}: use {_FLAG_NAMES}, "
                       "each optionally prefixed with '!' (must be clear)")
        bit = vocab.TCP_FLAGS[name]
        if mask & bit:
            raise fail(f"flag '{name}' is given twice")
        mask |= bit
        if not clear:
            bits |= bit
    return mask, bits


def format_tcp_flags(flags: tuple[int, int]) -> str:
    mask, bits = flags
    return ",".join(("" if bits & bit else "!") + name
                    for name, bit in vocab.TCP_FLAGS.items() if mask & bit)


TcpFlags = Annotated[
    tuple[int, int], PlainValidator(_check_tcp_flags),
    PlainSerializer(_nullable(format_tcp_flags)),
    WithJsonSchema({"anyOf": [
        {"type": "string", "description": "comma-separated flags; '!' = must be clear"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "object", "additionalProperties": {"type": "boolean"},
         "description": "flag: true (set) or false (clear)"}],
        "examples": ["syn,!ack", ["syn"], {"syn": True, "ack": False}]})]


def _duration(value: Any) -> float:
    _no_null(value)
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)\s*", value)
        if m:
            seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]
    if seconds is None:
        raise fail(f"must be a duration like 2s or 500ms (got {describe(value)})")
    if not 0.01 <= seconds <= 3600:
        raise fail(f"must be between 10ms and 1h (got {describe(value)})")
    return seconds


def _long_duration(value: Any) -> float:
    """A duration of 1s to 7 days; also in hours (12h) or days (2d)."""
    _no_null(value)
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*", value)
        if m:
            seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0,
                                           "d": 86400.0}[m.group(2)]
    if seconds is None:
        raise fail(f"must be a duration like 30s, 15m or 2h (got {describe(value)})")
    if not 1 <= seconds <= 7 * 86400:
        raise fail(f"must be between 1s and 7d (got {describe(value)})")
    return seconds


LongDuration = Annotated[float, PlainValidator(_long_duration), WithJsonSchema({"anyOf": [
    {"type": "number", "description": "seconds"},
    {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)\s*$"}],
    "examples": ["30s", "15m", "2h"]})]


Duration = Annotated[float, PlainValidator(_duration), WithJsonSchema({"anyOf": [
    {"type": "number", "description": "seconds"},
    {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m)\s*$"}],
    "examples": ["2s", "500ms", 5]})]


def _one_of(*words: str) -> Any:
    def check(value: Any) -> str:
        _no_null(value)
        if value not in words:
            raise fail(f"must be {', '.join(words[:-1])} or {words[-1]} (got {describe(value)})")
        return value
    return Annotated[str, PlainValidator(check), WithJsonSchema({"enum": list(words)})]


def _check_version(value: Any) -> int:
    if isinstance(value, str) and value.strip() == "1":
        raise fail(f"must be the number 1, not the string {describe(value)}: write "
                   "'version: 1' without quotes")
    if value != 1 or not _is_int(value):
        raise fail(f"unsupported policy version {describe(value)}; this netbpf reads version 1")
    return 1


# ---- objects ------------------------------------------------------------------------------

class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


Port = int_range(1, 65535)
PacketRate = int_range(1, 1_000_000_000)
IcmpCode = int_range(0, 255)
Weight = int_range(0, 65535)
RatePer = _one_of("src", "rule")


def _check_ct(value: Any) -> str:
    _no_null(value)
    if value != "invalid":
        raise fail(f"must be invalid (got {describe(value)}): netbpf rules see the packets "
                   "conntrack did not pass, so 'invalid' is the one state to match")
    return value


CtState = Annotated[str, PlainValidator(_check_ct), WithJsonSchema({"enum": ["invalid"]})]
Verdict = _one_of("allow", "drop")
XdpMode = _one_of("auto", "native", "generic", "offload")
LbProto = _one_of("tcp", "udp")
LbMode = _one_of("nat", "dsr")


class RateLimit(StrictModel):
    """Token bucket: packets within the rate are allowed (no further rules), the rest dropped."""
    pps: PacketRate = Field(
        description="Packets per second let through.")
    burst: PacketRate = Field(
        None, description="Bucket depth in packets (default: pps, one second's worth).")
    per: RatePer = Field(
        "src", description="src: one bucket per source address; rule: one bucket for the rule.")


class RateLimitAction(StrictModel):
    rate_limit: RateLimit = Field(description="Allow up to pps packets per second, drop the rest.")


# Words iptables and nftables users bring with them, and what netbpf calls them.
_ACTION_HABITS = {
    "accept": "iptables' ACCEPT / nft's accept is 'allow' here",
    "return": "there are no chains to return from; a rule that matches ends the walk (count "
              "goes on)",
    "log": "sampling replaces log: keep the action and add 'sample: N' (see 'netbpf events')",
}


def _check_action_word(value: Any) -> str:
    _no_null(value)
    if value in ("allow", "drop", "reject", "count"):
        return value
    msg = f"must be allow, drop, reject, count or {{rate_limit: ...}} (got {describe(value)})"
    word = value.lower() if isinstance(value, str) else None
    if word in _ACTION_HABITS:
        msg += f"; {_ACTION_HABITS[word]}"
    elif word in ("allow", "drop", "reject", "count"):
        msg += f"; actions are lower case: {word}"
    raise fail(msg)


ActionWord = Annotated[str, PlainValidator(_check_action_word),
                       WithJsonSchema({"enum": ["allow", "drop", "reject", "count"]})]


def _action_kind(value: Any) -> str | None:
    if isinstance(value, (dict, RateLimitAction)):
        return "rate_limit"
    if isinstance(value, str):
        return "word"
    return None


Action = Annotated[
    Union[Annotated[ActionWord, Tag("word")], Annotated[RateLimitAction, Tag("rate_limit")]],
    Discriminator(_action_kind, custom_error_type="netbpf",
                  custom_error_message="must be allow, drop, reject, count or {rate_limit: ...}")]


class Rule(StrictModel):
    """One firewall rule. Every field given must match (AND); absent fields match anything."""
    name: Name = Field(description="Unique per interface; shown by 'netbpf stats'.")
    src: AddrSpec = Field(None, description="Source address, CIDR, list of them, or '@set'.")
    dst: AddrSpec = Field(None, description="Destination address, CIDR, list, or '@set'.")
    proto: Proto = Field(None, description="tcp, udp, icmp, icmpv6, sctp, gre, esp, ah, "
                                           "any (default) or a protocol number 0-255.")
    sport: Ports = Field(None, description="Source ports: 22, '1024-65535' or a list; "
                                           "tcp/udp only (with proto any: tcp or udp).")
    dport: Ports = Field(None, description="Destination ports, same forms as sport.")
    icmp_type: IcmpType = Field(None, description="ICMP/ICMPv6 type name (echo-request...) "
                                                  "or number; needs proto icmp or icmpv6.")
    icmp_code: IcmpCode = Field(
        None, description="ICMP code 0-255; needs icmp_type.")
    tcp_flags: TcpFlags = Field(None, description="'syn,!ack': syn set and ack clear, other "
                                                  "flags ignored; needs proto tcp.")
    ct: CtState = Field(None, description="invalid: TCP packets whose flags no connection "
                                          "carries (as Linux conntrack's INVALID); needs "
                                          "conntrack on the interface.")
    action: Action = Field(description="allow, drop, reject (drop and answer: TCP RST, else "
                                       "ICMP port unreachable), count (count and go on), or "
                                       "{rate_limit: {pps, burst, per}}.")
    sample: int = Field(None, ge=1, le=1 << 31,
                        description="1 in N packets this rule decides become events for "
                                    "'netbpf events' (overrides the direction's sample).")

    _line: int = PrivateAttr(0)
    _icmp_number: int | None = PrivateAttr(None)

    @property
    def action_name(self) -> str:
        return self.action if isinstance(self.action, str) else "rate_limit"

    @model_validator(mode="after")
    def _check_fields_together(self) -> Rule:
        problems: list[Problem] = []
        proto = self.proto
        if (self.sport is not None or self.dport is not None) and \
                proto not in (None, *vocab.PORT_PROTOCOLS):
            key = "dport" if self.dport is not None else "sport"
            problems.append(((key,), "ports match only tcp and udp "
                                     f"(proto is {vocab.proto_name(proto)})"))
        if self.icmp_type is not None:
            if proto not in (vocab.PROTO_ICMP, vocab.PROTO_ICMPV6):
                problems.append((("icmp_type",), "icmp_type needs proto icmp or icmpv6 "
                                                 f"(proto is {vocab.proto_name(proto)})"))
            elif isinstance(self.icmp_type, int):
                self._icmp_number = self.icmp_type
            else:
                number = vocab.icmp_type_number(proto, self.icmp_type)
                if number is None:
                    problems.append((("icmp_type",), self._icmp_name_problem(proto)))
                self._icmp_number = number
        if self.icmp_code is not None and self.icmp_type is None:
            problems.append((("icmp_code",), "icmp_code needs icmp_type"))
        if self.ct is not None:
            if proto not in (None, vocab.PROTO_TCP):
                problems.append((("ct",), "ct: invalid matches TCP packets; proto must be tcp "
                                          f"or left out (proto is {vocab.proto_name(proto)})"))
            if self.tcp_flags is not None:
                problems.append((("tcp_flags",), "ct: invalid already decides on the TCP flags; "
                                                 "remove tcp_flags"))
            if self.icmp_type is not None:
                problems.append((("ct",), "ct: invalid matches TCP packets, not ICMP"))
        if self.tcp_flags is not None and proto != vocab.PROTO_TCP:
            problems.append((("tcp_flags",), "tcp_flags needs proto tcp "
                                             f"(proto is {vocab.proto_name(proto)})"))
        family_problem = family_conflict(self, address_families(self.src),
                                         address_families(self.dst))
        if family_problem:
            problems.append(family_problem)
        if problems:
            raise fail_all(problems)
        return self

    def _icmp_name_problem(self, proto: int) -> str:
        other = vocab.PROTO_ICMPV6 if proto == vocab.PROTO_ICMP else vocab.PROTO_ICMP
        here, there = vocab.proto_name(proto), vocab.proto_name(other)
        if vocab.icmp_type_number(other, str(self.icmp_type)) is not None:
            return (f"'{self.icmp_type}' is an {there.upper().replace('V6', 'v6')} type, not "
                    f"{here.upper().replace('V6', 'v6')}: use proto {there}, or one of "
                    f"{', '.join(vocab.icmp_type_names(proto))}")
        return f"unknown {here} type '{self.icmp_type}'"


def address_families(match: AddrMatch | None) -> frozenset[int] | None:
    """Families a src/dst field can match; None when unknown or any (no field, or a set)."""
    if match is None or match.set_name is not None:
        return None
    return frozenset(p.family for p in match.prefixes)


def family_conflict(rule: Rule, src: frozenset[int] | None,
                    dst: frozenset[int] | None) -> Problem | None:
    """A rule no packet can match because its addresses and protocol disagree on the family."""
    if src is not None and dst is not None and not src & dst:
        return (("dst",), f"src is {_fam(src)} and dst is {_fam(dst)}: "
                          "no packet can match both")
    proto_family = {vocab.PROTO_ICMP: 4, vocab.PROTO_ICMPV6: 6}.get(rule.proto)
    if proto_family is not None:
        for key, fams in (("src", src), ("dst", dst)):
            if fams is not None and proto_family not in fams:
                fix = "icmpv6" if proto_family == 4 else "icmp"
                return ((key,), f"{key} is {_fam(fams)} but proto "
                                f"{vocab.proto_name(rule.proto)} is IPv{proto_family}-only "
                                f"(use proto {fix})")
    return None


def _fam(families: frozenset[int]) -> str:
    return " and ".join(f"IPv{f}" for f in sorted(families))


class Direction(StrictModel):
    default: Verdict = Field(
        "allow", description="Verdict when no allow/drop/rate_limit rule matches.")
    rules: list[Rule] = Field(default_factory=list,
                              description="First match wins, in file order; count goes on.")
    sample: int = Field(None, ge=1, le=1 << 31,
                        description="1 in N packets of every rule and of the default action "
                                    "become events for 'netbpf events' (default: none).")
    hook: Literal["xdp", "tc"] = Field(
        "xdp", description="Where ingress rules run: xdp (before the stack, fastest) or tc "
                           "(clsact ingress: after GRO, on any device).")


class EgressDirection(Direction):
    hook: Literal["tc"] = Field("tc", description="Egress rules always run on tc (clsact "
                                                  "egress): XDP sees received packets only.")


class XdpOptions(StrictModel):
    mode: XdpMode = Field(
        "auto", description="auto tries native then generic; offload needs a capable NIC.")


class ConntrackTimeouts(StrictModel):
    tcp_syn: float = Field(30.0, gt=0, le=86400 * 7,
                           description="Seconds a SYN we sent waits for its SYN-ACK.")
    tcp_established: float = Field(3600.0, gt=0, le=86400 * 7,
                                   description="Seconds an idle established TCP connection lives.")
    tcp_close: float = Field(10.0, gt=0, le=86400 * 7,
                             description="Seconds after a FIN before the entry expires.")
    udp: float = Field(30.0, gt=0, le=86400 * 7,
                       description="Seconds an idle UDP flow we started accepts replies.")
    icmp: float = Field(30.0, gt=0, le=86400 * 7,
                        description="Seconds an echo request we sent accepts its reply.")


class ConntrackOptions(StrictModel):
    enabled: bool = Field(True, description="Track connections (a mapping means yes).")
    timeouts: ConntrackTimeouts = Field(default_factory=ConntrackTimeouts,
                                        description="Idle timeouts per protocol and state.")


def _ct_from_bool(value: Any) -> Any:
    # `conntrack: true` is shorthand for the mapping; one model keeps error messages single
    if isinstance(value, bool):
        return {"enabled": value}
    if not isinstance(value, dict):
        raise fail(f"must be true, false or a mapping with timeouts (got {describe(value)})")
    return value


def _ct_schema(schema: dict) -> None:
    ref = schema.pop("$ref", None) or (schema.pop("allOf", [{}])[0].get("$ref"))
    schema["anyOf"] = [{"type": "boolean"}, {"$ref": ref}]


class Interface(StrictModel):
    xdp: XdpOptions = Field(default_factory=XdpOptions, description="XDP attach options.")
    conntrack: Annotated[ConntrackOptions, BeforeValidator(_ct_from_bool)] = Field(
        default_factory=lambda: ConntrackOptions(enabled=False), json_schema_extra=_ct_schema,
        description="Replies of connections started from this side pass ingress whatever the "
                    "rules say: true, or a mapping with timeouts.")
    ingress: Direction = Field(None, description="Rules for received packets (XDP).")
    egress: EgressDirection = Field(None, description="Rules for sent packets (TC egress).")

    @model_validator(mode="after")
    def _ct_needs_conntrack(self) -> Interface:
        if self.conntrack.enabled:
            return self
        problems: list[Problem] = []
        for key in ("ingress", "egress"):
            d = getattr(self, key)
            for i, r in enumerate(d.rules if d else ()):
                if r.ct is not None:
                    problems.append(((key, "rules", i, "ct"),
                                     "ct: invalid needs conntrack: true on this interface"))
        if problems:
            raise fail_all(problems)
        return self


class SetFile(StrictModel):
    file: str = Field(min_length=1, description="Path relative to the policy file's folder: "
                                                "one address or CIDR a line, '#' comments.")

    # Filled by load.py: (v4 entries, v6 entries) and the file's bytes for the policy hash.
    _entries: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = PrivateAttr(None)
    _path: str = PrivateAttr("")
    # sha256 of the file's bytes (the set's digest), and whether every line is a bare IPv4
    # address and no line repeats (a line is then its entry: netbpf/engine/setfiles.py diffs
    # such files by line)
    _sha: str = PrivateAttr("")
    _plain: bool = PrivateAttr(False)


def _check_set_entry(value: Any) -> tuple[int, int, int]:
    _no_null(value)
    if not isinstance(value, str):
        raise fail(f"must be an address or network ({_got(value)})")
    try:
        return parse_network(value)
    except AddrError as e:
        raise fail(str(e)) from None


SetEntry = Annotated[
    tuple[int, int, int], PlainValidator(_check_set_entry),
    PlainSerializer(lambda e: format_prefix(*e), return_type=str), WithJsonSchema(_ADDR_ITEM)]


def _set_kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "inline"
    return "file" if isinstance(value, (dict, SetFile)) else None


SetSpec = Annotated[
    Union[Annotated[list[SetEntry], Tag("inline")], Annotated[SetFile, Tag("file")]],
    Discriminator(_set_kind, custom_error_type="netbpf",
                  custom_error_message="must be a list of addresses/networks or a mapping "
                                       "with 'file'")]


class TcpHealth(StrictModel):
    port: Port = Field(None, description="Port to connect to (default: the backend's).")
    interval: Duration = Field(5.0, description="Time between checks.")
    timeout: Duration = Field(2.0, description="Connect timeout; at most interval.")


class Health(StrictModel):
    tcp: TcpHealth = Field(description="A backend is healthy while TCP connects succeed.")


class Backend(StrictModel):
    address: Address = Field(description="Backend address, same family as the VIP.")
    port: Port = Field(None, description="Backend port (default: the VIP port).")
    weight: Weight = Field(
        1, description="Share of new flows; 0 drains (existing flows stay).")


def _next_prime(n: int) -> int:
    while not is_prime(n):
        n += 1
    return n



MAX_TABLE_SIZE = 16_777_213  # largest prime below 2**24: bounds the Maglev map's memory
TableSize = int_range(2, MAX_TABLE_SIZE)


class LoadBalancer(StrictModel):
    interface: IfName = Field(description="Interface receiving VIP traffic; it needs no "
                                          "firewall rules of its own.")
    vip: Address = Field(description="Virtual IP address clients connect to.")
    port: Port = Field(description="VIP port.")
    proto: LbProto = Field(description="tcp or udp.")
    mode: LbMode = Field(
        "nat", description="nat rewrites the destination (replies come back through us); dsr "
                           "rewrites only the MAC (backends own the VIP, same port).")
    backends: list[Backend] = Field(min_length=1, description="Where flows go; Maglev spreads "
                                                              "new flows by weight.")
    table_size: TableSize = Field(
        65537, description="Maglev table size: a prime, ideally at least 100 x backends.")
    health: Health = Field(None, description="Optional health check (run by the controller).")
    idle_timeout: LongDuration = Field(
        None, description="A flow without packets this long is forgotten: its next packet "
                          "picks a backend through Maglev again (default 15m for tcp, 30s "
                          "for udp; 1s to 7d). A TCP SYN always picks anew.")

    @model_validator(mode="after")
    def _check_backends(self) -> LoadBalancer:
        problems: list[Problem] = []
        family, vip = self.vip
        seen: dict[tuple[int, int], int] = {}
        for i, b in enumerate(self.backends):
            b_family, b_addr = b.address
            shown = format_address(*b.address)
            if b_family != family:
                problems.append((("backends", i, "address"),
                                 f"IPv{b_family} backend {shown} for an IPv{family} VIP; "
                                 "backends must be the VIP's family"))
            elif b_addr == vip:
                problems.append((("backends", i, "address"),
                                 f"backend {shown} is the VIP itself"))
            port = b.port if b.port is not None else self.port
            if self.mode == "dsr" and port != self.port:
                problems.append((("backends", i, "port"),
                                 f"dsr only rewrites the MAC address, so the backend port must "
                                 f"be the VIP port {self.port} (got {port}); use mode nat to "
                                 "change ports"))
            key = (b_addr, port)
            if key in seen:
                problems.append((("backends", i),
                                 f"duplicate backend {shown} port {port} "
                                 f"(same as backends[{seen[key]}])"))
            seen.setdefault(key, i)
        if not is_prime(self.table_size):
            problems.append((("table_size",), f"must be a prime number (got {self.table_size}; "
                                              f"try {_next_prime(self.table_size)})"))
        elif self.table_size < len(self.backends):
            problems.append((("table_size",), f"must be at least the number of backends "
                                              f"({len(self.backends)})"))
        if self.health is not None and self.health.tcp.timeout > self.health.tcp.interval:
            problems.append((("health", "tcp", "timeout"),
                             "must not be longer than interval"))
        if problems:
            raise fail_all(problems)
        return self


class ProtectedFlow(StrictModel):
    """A flow that must stay allowed: 'netbpf apply' refuses a policy dropping it (issue 15)."""
    name: Name = Field(description="Shown when a rule would drop the flow.")
    interface: IfName = Field(None, description="Only this interface (default: every one).")
    src: Address = Field(description="Source address of the flow's packets as received.")
    dst: Address = Field(description="Destination address.")
    proto: Proto = Field("tcp", description="tcp (default), udp, icmp, ... or a number.")
    sport: Port = Field(None, description="Source port (default: any port above 1023).")
    dport: Port = Field(None, description="Destination port (tcp/udp).")


class Policy(StrictModel):
    """A netbpf policy: interfaces with firewall rules, named address sets, load balancers."""
    model_config = ConfigDict(title="netbpf policy", json_schema_extra={
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        # Top-level 'x-' keys are ignored by load_policy: a home for YAML anchors.
        "patternProperties": {"^x-": {}}})

    version: Annotated[int, PlainValidator(_check_version),
                       WithJsonSchema({"const": 1})] = Field(
        description="Policy language version; always 1.")
    sets: dict[Name, SetSpec] = Field(
        default_factory=dict, description="Named address sets, used in rules as '@name': a "
                                          "list of addresses/CIDRs or {file: path}.")
    interfaces: dict[IfName, Interface] = Field(
        default_factory=dict, description="Per-interface XDP/TC firewall.")
    load_balancers: dict[Name, LoadBalancer] = Field(
        default_factory=dict, description="L4 load balancers (VIP -> backends).")
    protect: list[ProtectedFlow] = Field(
        default_factory=list, description="Flows 'netbpf apply' must never cut off (checked in "
                                          "both directions; refused unless --force).")

    @model_validator(mode="after")
    def _check_across(self, info: Any) -> Policy:
        # load.py runs these itself, with set files read and errors placed in the file.
        if (info.context or {}).get("netbpf_defer_checks"):
            return self
        from netbpf.policy.checks import check_policy, view_of_model
        errors, _ = check_policy(view_of_model(self))
        if errors:
            raise fail_all(errors)
        return self
