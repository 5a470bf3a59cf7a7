"""A program loaded from the object cache (netbpf/kernel/objcache.py) is the program bcc built:
same instructions (the kernel's tag), same maps, the shared pinned map opened, not copied."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from netbpf.kernel import bpfsys, objcache
from netbpf.kernel.loader import load_program
from netbpf.store.progspec import REJECT_ENTRY, TC_EGRESS_PROG, TC_SOURCE


def test_a_stored_program_loads_without_the_compiler_and_is_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv(objcache.ENV, str(tmp_path / "cache"))
    pins = Path("/sys/fs/bpf") / f"nbt-objc-{uuid.uuid4().hex[:8]}"
    pins.mkdir()
    defines = {"NB_WORDS": 2, "NB_CLASS_CAP": 64, "NB_DIR_CHUNKS": 4, "NB_CONNTRACK": 1,
               "NB_SHARED_PIN": f'"{pins}"'}
    funcs = {TC_EGRESS_PROG: "sched_cls", REJECT_ENTRY["sched_cls"]: "sched_cls"}
    try:
        with load_program(TC_SOURCE, defines, funcs, stored=True) as built:
            assert built.bpf is not None                       # compiled by bcc
            assert len(list((tmp_path / "cache").glob("*.json"))) == 1
            with load_program(TC_SOURCE, defines, funcs, stored=True) as again:
                assert again.bpf is None                       # from the cache
                for name in funcs:
                    a, b = (bpfsys.prog_info(x.progs[name]) for x in (built, again))
                    assert (a.tag, a.type, a.name) == (b.tag, b.type, b.name), name
                    assert a.id != b.id
                assert set(built.maps) == set(again.maps)
                for name, m in built.maps.items():
                    n = again.maps[name]
                    assert (m.type, m.key_size, m.value_size, m.max_entries) == \
                           (n.type, n.key_size, n.value_size, n.max_entries), name
                    same = bpfsys.map_info(m.fd).id == bpfsys.map_info(n.fd).id
                    assert same == (name in ("nb_ct", "nb_ct_cfg")), name   # pinned: shared
                    assert bpfsys.map_info(m.fd).flags == bpfsys.map_info(n.fd).flags, name
    finally:
        shutil.rmtree(pins, ignore_errors=True)
