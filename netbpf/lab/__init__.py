"""The built-in netns lab: topologies from netns-lab/*.yaml brought up in network namespaces.

    from netbpf.lab import Lab
    with Lab.from_file("netns-lab/two-hosts.yaml") as lab:
        lab.ping("client", lab.addr("gw", "gw0"))

Light to import (no scapy, no bcc): the CLI and the reaper import it too.
"""
from netbpf.lab.lab import Lab, run_prefixes
from netbpf.lab.iproute import LabCommandError, LabError, RemoteTraceback, call_in_netns, list_netns
from netbpf.lab.registry import RANDOM_PREFIX_RE, cleanup, orphans, records
from netbpf.lab.topology import TOPOLOGY_DIR, Topology, TopologyError, load_topology, parse_topology

__all__ = [
    "Lab", "LabError", "LabCommandError", "RemoteTraceback", "Topology", "TopologyError",
    "TOPOLOGY_DIR", "RANDOM_PREFIX_RE", "call_in_netns", "cleanup", "list_netns", "load_topology",
    "orphans", "parse_topology", "records", "run_prefixes",
]
