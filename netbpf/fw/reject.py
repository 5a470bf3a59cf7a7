"""The reject replies' own programs (bpf/include/reject.h): their names per program type and
the one step that links them into the firewall's tail-call slot after a load.

Not the classifier's tables (fwtables.py) and not the packet building (reject.h).
"""
from __future__ import annotations

import struct

from netbpf.kernel import bpfsys

REJECT_ENTRY = {"xdp": "nb_rej_xdp", "sched_cls": "nb_rej_tc"}
_U32 = struct.Struct("<I")


def link_reject_entry(loaded, prog_type: str) -> None:
    """Point nb_rej_jump[0] at the reply builder loaded beside the firewall; until it is set,
    a reject rule only drops."""
    fd = loaded.prog_fd(REJECT_ENTRY[prog_type])
    bpfsys.map_update(loaded.maps["nb_rej_jump"].fd, _U32.pack(0), _U32.pack(fd))
