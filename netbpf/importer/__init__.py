"""netbpf import: iptables-save, nft (text and JSON) and ipvsadm -Sn -> a netbpf policy.

One module per source format parses into the neutral Ruleset (model.py); flatten.py orders it
into per-interface rules and emit.py writes the policy text. Pure: no kernel, no root.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from netbpf.importer.model import ImportInputError, Note, Ruleset

__all__ = ["ImportInputError", "ImportResult", "import_ruleset"]


@dataclass
class ImportResult:
    policy: str
    warnings: list[Note] = field(default_factory=list)


def import_ruleset(rs: Ruleset, title: str, interfaces: list[str] | None = None,
                   forward: bool = False,
                   load_balancers: list | None = None) -> ImportResult:
    from netbpf.importer.emit import emit_policy
    from netbpf.importer.flatten import Flattener

    out: dict = {}
    notes_in = list(rs.notes)
    if rs.tables:
        flat = Flattener(rs, list(interfaces or []), forward)
        out = flat.build()
        notes_in = flat.notes
    text = emit_policy(title, out, rs.sets, rs.set_where, load_balancers or [])
    seen: set[str] = set()
    notes = []
    for n in notes_in:
        if str(n) not in seen:
            seen.add(str(n))
            notes.append(n)
    return ImportResult(text, notes)
