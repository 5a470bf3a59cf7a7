"""Which BPF programs netbpf builds and how they are named, pinned and told apart.

The one place that knows source files, function names and the pins of a part; used by the
apply engine, the read path (status, stats, detach) and the tests. Not loading (kernel/loader.py).
"""
from __future__ import annotations

from netbpf import abi

FW_SOURCE = abi.BPF_DIR / "xdp" / "firewall.bpf.c"
FW_PROG = "nb_fw_xdp"
TC_SOURCE = abi.BPF_DIR / "tc" / "firewall.bpf.c"
TC_EGRESS_PROG = "nb_fw_tc_eg"
TC_INGRESS_PROG = "nb_fw_tc_in"
PROG_PIN = "prog"
# Maps of the ingress program that the egress program and later reloads open by pin:
# tracked connections, load-balanced flows and their NAT, LB counters survive program changes.
SHARED_MAPS = ("nb_ct", "nb_ct_cfg", "nb_lb_flows", "nb_lb_nat", "nb_lb_cnt")
PROGRAMS = {  # (direction, hook) -> (source, function, program type)
    ("ingress", "xdp"): (FW_SOURCE, FW_PROG, "xdp"),
    ("ingress", "tc"): (TC_SOURCE, TC_INGRESS_PROG, "sched_cls"),
    ("egress", "tc"): (TC_SOURCE, TC_EGRESS_PROG, "sched_cls"),
}
# Names the kernel reports for netbpf's attached programs (bpf_prog_info.name is cut at 15).
PROGRAM_NAMES = frozenset(func[:15] for _, func, _ in PROGRAMS.values())

