"""Lab topology files (netns-lab/*.yaml) -> checked, immutable dataclasses.

Pure: reads YAML and validates it, pointing every error at FILE:LINE:COL. It creates nothing;
netbpf.lab.lab.Lab turns a Topology into namespaces. The format is documented in netns-lab/README.md.

Over 400 lines because the topology schema and its positioned errors are one unit: split, a
field's check and its message would live apart.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netbpf.errors import InputError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Built-in topologies live next to the package in a source checkout (the package is installed editable).
TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "netns-lab"

IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1; no '/' or ':' (sysctl paths, aliases)
NODE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
SYSCTL_RE = re.compile(r"^net[./][A-Za-z0-9_./-]+$")


class TopologyError(InputError):
    """An invalid topology file; .errors holds every problem as 'FILE:LINE:COL: path: message'."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Interface:
    node: str
    name: str
    kind: str  # "veth" or "bridge"
    mac: str | None = None
    addresses: tuple[IPInterface, ...] = ()
    master: str | None = None  # bridge in the same node this veth end is a port of
    mtu: int | None = None
    peer: tuple[str, str] | None = None  # (node, name) of the other veth end

    def addrs(self, family: int | None = None) -> list[IPInterface]:
        return [a for a in self.addresses if family is None or a.version == family]


@dataclass(frozen=True)
class Route:
    to: IPNetwork
    via: IPAddress | None = None
    dev: str | None = None

    @property
    def family(self) -> int:
        return self.to.version

    def ip_args(self) -> list[str]:
        args = ["route", "add", str(self.to)]
        if self.via is not None:
            args += ["via", str(self.via)]
        if self.dev is not None:
            args += ["dev", self.dev]
        return args


@dataclass(frozen=True)
class Node:
    name: str
    sysctls: dict[str, str] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    # bridges first, then veth ends, in file order: the order they are created and brought up
    interfaces: dict[str, Interface] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    a: Interface
    b: Interface


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    path: str
    nodes: dict[str, Node]
    links: tuple[Link, ...]

    def interface(self, node: str, name: str) -> Interface:
        if node not in self.nodes:
            raise KeyError(f"topology {self.name!r} has no node {node!r} (nodes: {', '.join(self.nodes)})")
        ifaces = self.nodes[node].interfaces
        if name not in ifaces:
            raise KeyError(f"node {node!r} of topology {self.name!r} has no interface {name!r} "
                           f"(interfaces: {', '.join(ifaces) or 'none'})")
        return ifaces[name]


def resolve_path(spec: str | Path) -> Path:
    """A path as given, or the name of a built-in topology ('two-hosts' -> netns-lab/two-hosts.yaml)."""
    p = Path(spec)
    if p.exists():
        return p
    for cand in (TOPOLOGY_DIR / p.name, TOPOLOGY_DIR / f"{p.name}.yaml"):
        if p.parent == Path(".") and cand.is_file():
            return cand
    builtin = ", ".join(sorted(x.stem for x in TOPOLOGY_DIR.glob("*.yaml"))) or "none"
    raise InputError(f"{spec}: no such topology file (built-in topologies: {builtin})")


def load_topology(spec: str | Path) -> Topology:
    path = resolve_path(spec)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read topology file: {e.strerror}") from None
    return parse_topology(text, str(path))


def parse_topology(text: str, path: str = "<topology>") -> Topology:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    try:
        doc = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise TopologyError([f"{where}: invalid YAML: {e.problem}"]) from None
    return _Checker(path).topology(doc)


class _Checker:
    """Walks the YAML tree once, collecting every error with its position instead of stopping at the first."""

    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []
        self._keys: list[tuple[int, int]] = []
        self.mac_pos: dict[tuple[str, str], tuple[int, int] | None] = {}

    # -- positions -------------------------------------------------------------------------------
    def err(self, where: tuple[int, int] | None, dotted: str, msg: str) -> None:
        loc = f"{self.path}:{where[0] + 1}:{where[1] + 1}" if where else self.path
        self._keys.append(where or (1 << 30, 0))
        self.errors.append(f"{loc}: {dotted}: {msg}" if dotted else f"{loc}: {msg}")

    def fail(self) -> TopologyError:
        # checks run by kind (nodes, links, routes): report in file order, as an editor would
        order = sorted(range(len(self.errors)), key=lambda i: self._keys[i])
        return TopologyError([self.errors[i] for i in order])

    @staticmethod
    def pos_key(m: Any, key: Any) -> tuple[int, int] | None:
        try:
            return tuple(m.lc.key(key))  # type: ignore[return-value]
        except Exception:
            return _Checker.pos_of(m)

    @staticmethod
    def pos_val(m: Any, key: Any) -> tuple[int, int] | None:
        try:
            return tuple(m.lc.value(key))  # type: ignore[return-value]
        except Exception:
            return _Checker.pos_key(m, key)

    @staticmethod
    def pos_item(s: Any, i: int) -> tuple[int, int] | None:
        try:
            return tuple(s.lc.item(i))  # type: ignore[return-value]
        except Exception:
            return None

    @staticmethod
    def pos_of(node: Any) -> tuple[int, int] | None:
        lc = getattr(node, "lc", None)
        return (lc.line, lc.col) if lc is not None and lc.line is not None else None

    def mapping(self, value: Any, where, dotted: str, allowed: set[str], required: set[str] = frozenset()) -> bool:
        if not isinstance(value, dict):
            self.err(where, dotted, f"must be a mapping (got {type(value).__name__})")
            return False
        for k in value:
            if k not in allowed:
                self.err(self.pos_key(value, k), f"{dotted}.{k}" if dotted else str(k),
                         f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required - set(value)):
            self.err(where, dotted, f"missing required key {k!r}")
        return True

    def seq(self, value: Any, where, dotted: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(where, dotted, f"must be a list (got {type(value).__name__})")
            return []
        return value

    # -- document --------------------------------------------------------------------------------
    def topology(self, doc: Any) -> Topology:
        if not self.mapping(doc, None, "", {"name", "description", "nodes", "links"}, {"nodes"}):
            raise self.fail()
        name = str(doc.get("name") or Path(self.path).stem)
        description = str(doc.get("description") or "")

        raw_nodes = doc.get("nodes")
        if not isinstance(raw_nodes, dict) or not raw_nodes:
            self.err(self.pos_val(doc, "nodes"), "nodes", "must be a non-empty mapping of node name -> settings")
            raise self.fail()

        node_specs: dict[str, dict] = {}
        ifaces: dict[str, dict[str, Interface]] = {}
        for nname, spec in raw_nodes.items():
            dotted = f"nodes.{nname}"
            if not isinstance(nname, str) or not NODE_RE.match(nname):
                self.err(self.pos_key(raw_nodes, nname), dotted,
                         "node names are 1-16 characters: lower-case letter, then [a-z0-9_-]")
                continue
            spec = spec if spec is not None else {}
            if not self.mapping(spec, self.pos_val(raw_nodes, nname), dotted, {"sysctls", "routes", "bridges"}):
                continue
            node_specs[nname] = spec
            ifaces[nname] = {}
            for i, br in enumerate(self.seq(spec.get("bridges"), self.pos_val(spec, "bridges"), f"{dotted}.bridges")):
                bdot = f"{dotted}.bridges[{i}]"
                iface = self.interface(br, self.pos_item(spec["bridges"], i), bdot, nname, "bridge")
                if iface:
                    self.add_iface(ifaces[nname], iface, br, bdot)

        links: list[Link] = []
        raw_links = self.seq(doc.get("links"), self.pos_val(doc, "links"), "links")
        for i, ln in enumerate(raw_links):
            ldot = f"links[{i}]"
            lpos = self.pos_item(raw_links, i)
            if not isinstance(ln, dict) or len(ln) != 2:
                self.err(lpos, ldot, "a link is a mapping of exactly two ends, node name -> interface "
                         "(e.g. {client: {name: client0}, gw: {name: gw0}})")
                if not isinstance(ln, dict):
                    continue
            ends: list[Interface] = []
            for nname, end in ln.items():
                edot = f"{ldot}.{nname}"
                if nname not in node_specs:
                    self.err(self.pos_key(ln, nname), edot, f"unknown node (nodes: {', '.join(node_specs)})")
                    continue
                iface = self.interface(end, self.pos_val(ln, nname), edot, nname, "veth")
                if iface:
                    ends.append(iface)
            if len(ends) == 2 and len(ln) == 2:
                a, b = ends
                ends = [replace(a, peer=(b.node, b.name)), replace(b, peer=(a.node, a.name))]
            # a valid end joins its node even if the other end is broken, so later checks
            # (gateways in a subnet, duplicate MACs) see it and do not report noise
            added = [self.add_iface(ifaces[e.node], e, ln[e.node], f"{ldot}.{e.node}") for e in ends]
            if len(ends) == 2 and len(ln) == 2 and all(added):
                links.append(Link(*ends))

        self.check_masters(ifaces, raw_links)
        self.check_macs(ifaces)

        nodes: dict[str, Node] = {}
        for nname, spec in node_specs.items():
            dotted = f"nodes.{nname}"
            sysctls = self.sysctls(spec, dotted)
            routes = self.routes(spec, dotted, ifaces[nname])
            # bridges before veths: a port's master must exist when the port is enslaved
            ordered = dict(sorted(ifaces[nname].items(), key=lambda kv: kv[1].kind != "bridge"))
            nodes[nname] = Node(nname, sysctls, tuple(routes), ordered)

        if self.errors:
            raise self.fail()
        return Topology(name, description, self.path, nodes, tuple(links))

    # -- pieces ----------------------------------------------------------------------------------
    def interface(self, spec: Any, where, dotted: str, node: str, kind: str) -> Interface | None:
        allowed = {"name", "mac", "addresses", "mtu"} | ({"master"} if kind == "veth" else set())
        if not self.mapping(spec, where, dotted, allowed, {"name"}):
            return None
        name = spec.get("name")
        ok = True
        if not isinstance(name, str) or not IFNAME_RE.match(name) or name == "lo":
            self.err(self.pos_val(spec, "name"), f"{dotted}.name",
                     f"interface names are 1-15 characters of [A-Za-z0-9_.-], not 'lo' (got {name!r})")
            ok = False
        mac = spec.get("mac")
        if mac is not None:
            mac = str(mac)
            if not MAC_RE.match(mac):
                self.err(self.pos_val(spec, "mac"), f"{dotted}.mac", f"not a MAC address like 02:00:00:00:00:01 (got {mac!r})")
                ok = False
            elif int(mac[:2], 16) & 1:
                self.err(self.pos_val(spec, "mac"), f"{dotted}.mac", f"{mac} is a multicast MAC; the first octet must be even")
                ok = False
            mac = mac.lower()
            if isinstance(name, str):
                self.mac_pos[(node, name)] = self.pos_val(spec, "mac")
        addrs: list[IPInterface] = []
        raw = self.seq(spec.get("addresses"), self.pos_val(spec, "addresses"), f"{dotted}.addresses")
        for j, a in enumerate(raw):
            adot, apos = f"{dotted}.addresses[{j}]", self.pos_item(raw, j)
            if "/" not in str(a):
                self.err(apos, adot, f"{a!r} needs a prefix length, e.g. 10.0.0.1/24")
                ok = False
                continue
            try:
                addrs.append(ipaddress.ip_interface(str(a)))
            except ValueError as e:
                self.err(apos, adot, f"{a!r} is not a valid address/prefix ({e})")
                ok = False
        mtu = spec.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535):
            self.err(self.pos_val(spec, "mtu"), f"{dotted}.mtu", f"must be an integer 68-65535 (got {mtu!r})")
            ok = False
        master = spec.get("master")
        if master is not None and not isinstance(master, str):
            self.err(self.pos_val(spec, "master"), f"{dotted}.master", "must be the name of a bridge in the same node")
            ok = False
        if not ok:
            return None
        return Interface(node=node, name=name, kind=kind, mac=mac, addresses=tuple(addrs), master=master, mtu=mtu)

    def add_iface(self, table: dict[str, Interface], iface: Interface, spec: Any, dotted: str) -> bool:
        if iface.name in table:
            self.err(self.pos_val(spec, "name"), f"{dotted}.name",
                     f"node {iface.node!r} already has an interface named {iface.name!r}")
            return False
        table[iface.name] = iface
        return True

    def check_masters(self, ifaces: dict[str, dict[str, Interface]], raw_links: list) -> None:
        for i, ln in enumerate(raw_links):
            if not isinstance(ln, dict):
                continue
            for nname, end in ln.items():
                if not isinstance(end, dict) or nname not in ifaces or "master" not in end:
                    continue
                master = end["master"]
                br = ifaces[nname].get(master) if isinstance(master, str) else None
                if br is None or br.kind != "bridge":
                    bridges = [x.name for x in ifaces[nname].values() if x.kind == "bridge"]
                    self.err(self.pos_val(end, "master"), f"links[{i}].{nname}.master",
                             f"node {nname!r} has no bridge {master!r} (bridges: {', '.join(bridges) or 'none'})")

    def check_macs(self, ifaces: dict[str, dict[str, Interface]]) -> None:
        seen: dict[str, str] = {}
        for node, table in ifaces.items():
            for iface in table.values():
                if iface.mac is None:
                    continue
                if iface.mac in seen:
                    self.err(self.mac_pos.get((node, iface.name)), f"{node}/{iface.name}.mac",
                             f"{iface.mac} is also used by {seen[iface.mac]}; lab MACs must be unique")
                seen.setdefault(iface.mac, f"{node}/{iface.name}")

    def sysctls(self, spec: dict, dotted: str) -> dict[str, str]:
        raw = spec.get("sysctls")
        out: dict[str, str] = {}
        if raw is None:
            return out
        if not isinstance(raw, dict):
            self.err(self.pos_val(spec, "sysctls"), f"{dotted}.sysctls", "must be a mapping of sysctl -> value")
            return out
        for k, v in raw.items():
            kdot = f"{dotted}.sysctls.{k}"
            # only net.* is per network namespace: anything else would change the host
            if not isinstance(k, str) or not SYSCTL_RE.match(k) or ".." in k:
                self.err(self.pos_key(raw, k), kdot, "only per-namespace 'net.*' sysctls are allowed "
                         "(e.g. net.ipv4.ip_forward)")
                continue
            if isinstance(v, bool):
                v = int(v)
            if not isinstance(v, (int, str)):
                self.err(self.pos_val(raw, k), kdot, f"value must be a number or string (got {type(v).__name__})")
                continue
            out[k] = str(v)
        return out

    def routes(self, spec: dict, dotted: str, ifaces: dict[str, Interface]) -> list[Route]:
        out: list[Route] = []
        raw = self.seq(spec.get("routes"), self.pos_val(spec, "routes"), f"{dotted}.routes")
        connected = [a.network for i in ifaces.values() for a in i.addresses]
        for i, r in enumerate(raw):
            rdot, rpos = f"{dotted}.routes[{i}]", self.pos_item(raw, i)
            if not self.mapping(r, rpos, rdot, {"to", "via", "dev"}, {"to"}):
                continue
            via = dev = None
            if r.get("via") is not None:
                try:
                    via = ipaddress.ip_address(str(r["via"]))
                except ValueError:
                    self.err(self.pos_val(r, "via"), f"{rdot}.via", f"{r['via']!r} is not an IP address")
                    continue
            if r.get("dev") is not None:
                dev = str(r["dev"])
                if dev not in ifaces:
                    self.err(self.pos_val(r, "dev"), f"{rdot}.dev",
                             f"node has no interface {dev!r} (interfaces: {', '.join(ifaces) or 'none'})")
                    continue
            to_raw = str(r["to"])
            if to_raw == "default":
                if via is None:
                    self.err(rpos, rdot, "a default route needs 'via' (its address family comes from it)")
                    continue
                to = ipaddress.ip_network("0.0.0.0/0" if via.version == 4 else "::/0")
            else:
                try:
                    to = ipaddress.ip_network(to_raw, strict=True)
                except ValueError as e:
                    self.err(self.pos_val(r, "to"), f"{rdot}.to", f"{to_raw!r} is not 'default' or a network ({e})")
                    continue
            if via is None and dev is None:
                self.err(rpos, rdot, "a route needs 'via', 'dev' or both")
                continue
            if via is not None and via.version != to.version:
                self.err(self.pos_val(r, "via"), f"{rdot}.via", f"IPv{via.version} gateway for an IPv{to.version} route")
                continue
            # the kernel refuses an unreachable gateway at run time; say so now, with a position
            if via is not None and dev is None and not any(via in n for n in connected):
                self.err(self.pos_val(r, "via"), f"{rdot}.via",
                         f"{via} is not in any subnet of this node ({', '.join(map(str, connected)) or 'no addresses'})")
                continue
            out.append(Route(to, via, dev))
        return out

