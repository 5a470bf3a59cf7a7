"""The reject replies' own programs (bpf/include/reject.h): the one step that links them into
the firewall's tail-call slot after a load (their names per program type: store/progspec.py).

Not the classifier's tables (fwtables.py) and not the packet building (reject.h).
"""
from __future__ import annotations

from netbpf import abi
from netbpf.kernel import bpfsys
from netbpf.store.progspec import REJECT_ENTRY


def link_reject_entry(loaded, prog_type: str) -> None:
    """Point nb_rej_jump[0] at the reply builder loaded beside the firewall; until it is set,
    a reject rule only drops."""
    fd = loaded.prog_fd(REJECT_ENTRY[prog_type])
    bpfsys.map_update(loaded.maps[abi.NB_MAP_REJ_JUMP].fd, abi.U32.pack(0), abi.U32.pack(fd))
