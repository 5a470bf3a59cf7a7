"""An in-memory kernel for the apply engine's unprivileged tests: programs, maps
(fakemaps.py), pins (plain files under a temporary root, each naming an object id), XDP and
TC attachments (netlink and bpf_link; a link no pin or fd holds is released), interfaces
with ifindexes, namespaces.

It implements netbpf/kernel/api.py's Kernel and, for the table codecs that speak bpf(2)
through bpfsys (fw/fwtables.py, lb/lbtables.py), bpfsys' map and object calls (install()).
fail_on() makes the n-th call of a kernel call raise, as a refused syscall would;
snapshot() and restore() put the kernel and the files back where a SIGKILL would leave them.
Not a model of the data plane: no program ever runs; the real-kernel tests show that.
Over 400 lines: one fake of one surface (objects, netlink, links); the halves would reach
into each other's tables.
"""
from __future__ import annotations

import copy
import errno
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fakemaps import ARRAYS, PERCPU_ARRAY, Map, MapCalls, program_maps
from netbpf.kernel import attach, bpfsys, link
from netbpf.kernel.bpfsys import KernelError, MapInfo, ProgInfo
from netbpf.kernel.loader import LoadedMap
from netbpf.store.progspec import SHARED_MAPS

PROG_TYPE = {"xdp": 6, "sched_cls": 3}

@dataclass
class Prog:
    id: int
    name: str
    type: int


@dataclass
class Link:
    id: int
    kind: str                # xdp | tcx
    prog_id: int
    ifindex: int             # 0: detached
    hook: str                # xdp | ingress | egress


class Fd:
    """A descriptor of the fake kernel: an int for the codecs, closes once."""

    def __init__(self, k: "FakeKernel", obj_id: int):
        self.k, self.fd, self.owned = k, k._new_fd(obj_id), True

    def __int__(self) -> int:
        if self.fd < 0:
            raise KernelError("descriptor already closed", errno.EBADF)
        return self.fd

    __index__ = __int__

    def close(self) -> None:
        self.k.fds.pop(self.fd, None)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FakeLoaded:
    """What load_program returns: programs (not attached) and maps, like loader.Loaded."""

    def __init__(self, k: "FakeKernel", source: Path, progs: dict, maps: dict):
        self.k, self.source, self.progs, self.maps = k, source, progs, maps

    def prog_fd(self, name: str) -> int:
        return int(self.progs[name])

    def prog_id(self, name: str) -> int:
        return self.k.fds[int(self.progs[name])]

    def map_fd(self, name: str) -> int:
        return int(self.maps[name].fd)

    def pin_maps(self, directory, names=None, replace=False) -> dict:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = {}
        for name in names if names is not None else list(self.maps):
            self.k.obj_pin(self.maps[name].fd, directory / name)
            out[name] = directory / name
        return out

    def close(self) -> None:
        for fd in self.progs.values():
            fd.close()
        for m in self.maps.values():
            m.fd.close()


def _copy_obj(o):
    c = copy.copy(o)
    if isinstance(o, Map):
        c.data = dict(o.data)       # values are bytes: a shallow copy is a copy
        c.buf = bytearray(o.buf) if o.buf is not None else None
    return c


class Killed(BaseException):
    """Raised at a kill point: the test then restores what the kill left (restore())."""


class FakeKernel(MapCalls):
    def __init__(self, root: Path, links: bool = True, cpus: int = 2):
        self.root = root                     # pins and state files live under it
        self.links = links                   # False: a kernel without bpf_link (netlink path)
        self.cpus = cpus
        self.objs: dict[int, object] = {}
        self.fds: dict[int, int] = {}        # fd -> object id
        self.ifaces: dict[tuple, int] = {}   # (netns, ifname) -> ifindex
        self.namespaces: set[str] = set()
        self.xdp: dict[int, attach.XdpState] = {}            # netlink-attached
        self.xdp_links: dict[int, int] = {}                  # ifindex -> link id
        self.tc: dict[tuple, attach.TcFilter] = {}           # (ifindex, dir) -> our filter
        self.foreign_tc: dict[tuple, list] = {}              # other tools' filters
        self.clsact: set[int] = set()
        self.tcx: dict[tuple, list[int]] = {}                # (ifindex, dir) -> link ids
        self.forwarding_off: set[str] = set()
        self.loads: list[dict] = []                          # defines of every load
        self.calls: Counter = Counter()
        self._fail: dict[str, int] = {}
        self.last_failed = ""
        self._next = 100

    # ---- test controls ----
    def add_interface(self, ifname: str, netns: str | None = None) -> int:
        if netns:
            self.namespaces.add(netns)
        self._next += 1
        self.ifaces[(netns, ifname)] = self._next
        return self._next

    def remove_interface(self, ifname: str, netns: str | None = None) -> None:
        index = self.ifaces.pop((netns, ifname))
        self.xdp.pop(index, None)
        self.xdp_links.pop(index, None)
        self.clsact.discard(index)
        for key in [k for k in (*self.tc, *self.tcx) if k[0] == index]:
            self.tc.pop(key, None)
            self.tcx.pop(key, None)
        for o in self.objs.values():
            if isinstance(o, Link) and o.ifindex == index:
                o.ifindex = 0

    def fail_on(self, call: str, nth: int = 1) -> None:
        """The nth call of `call` from now raises EIO (once)."""
        self._fail[call] = nth

    def install(self, monkeypatch) -> None:
        """Serve bpfsys' map and object calls (the table codecs use them) from this kernel."""
        for name in ("obj_get", "obj_pin", "map_info", "prog_info", "map_lookup",
                     "map_lookup_percpu", "map_update", "map_delete", "map_keys",
                     "map_update_batch", "map_delete_batch", "map_lookup_batch",
                     "array_lookup_range", "num_possible_cpus"):
            monkeypatch.setattr(bpfsys, name, getattr(self, name))
        monkeypatch.setattr(bpfsys, "prog_get_fd_by_id", self.prog_fd_by_id)

    def snapshot(self, name: str = "killed") -> tuple:
        """What a SIGKILL now would leave: kernel objects and files, no open fds."""
        saved = self.root.with_name(f"{self.root.name}-{name}")
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(self.root, saved, symlinks=True)
        state = {k: copy.deepcopy(v) for k, v in vars(self).items()
                 if k not in ("root", "fds", "_fail", "calls", "objs")}
        state["objs"] = {i: _copy_obj(o) for i, o in self.objs.items()}
        return saved, state

    def restore(self, snap: tuple, keep: bool = False) -> None:
        """Back to snap (keep: it can be restored again)."""
        saved, state = snap
        shutil.rmtree(self.root)
        shutil.copytree(saved, self.root, symlinks=True)
        if not keep:
            shutil.rmtree(saved)
        vars(self).update({k: copy.deepcopy(v) for k, v in state.items() if k != "objs"})
        self.objs = {i: _copy_obj(o) for i, o in state["objs"].items()}
        self.fds.clear()
        self._fail.clear()

    # ---- inspection for tests ----
    def attached(self, ifname: str, netns: str | None = None) -> dict[str, int]:
        """hook -> program id running there (xdp, ingress/egress tc or tcx)."""
        index = self.ifaces[(netns, ifname)]
        out = {}
        if (x := self._xdp_now(index)) is not None:
            out["xdp"] = x.prog_id
        for d in ("ingress", "egress"):
            ids = [f.prog_id for f in [self.tc.get((index, d))] if f] + self._tcx_ids(index, d)
            if ids:
                out[d] = ids[0] if len(ids) == 1 else tuple(ids)
        return out

    def pinned_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in (self.root / "bpf").rglob("*")
                      if p.is_file())

    def map_at(self, path: Path) -> Map:
        return self.objs[int(path.read_text())]

    # ---- plumbing ----
    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if name in self._fail:
            self._fail[name] -= 1
            if self._fail[name] == 0:
                del self._fail[name]
                self.last_failed = name
                raise KernelError(f"{name}: injected failure [EIO]", errno.EIO)

    def _new_fd(self, obj_id: int) -> int:
        fd = max(self.fds, default=999) + 1
        self.fds[fd] = obj_id
        return fd

    def _obj(self, fd, kind=None):
        try:
            o = self.objs[self.fds[int(fd)]]
        except KeyError:
            raise KernelError(f"fd {int(fd)}: bad descriptor [EBADF]", errno.EBADF) from None
        if kind is not None and not isinstance(o, kind):
            raise KernelError(f"fd {int(fd)}: wrong kind of object [EINVAL]", errno.EINVAL)
        return o

    def _add(self, obj) -> int:
        self._next += 1
        obj.id = self._next
        self.objs[obj.id] = obj
        return obj.id

    def _index(self, ifname: str, netns: str | None) -> int:
        i = self.ifindex(ifname, netns)
        if i is None:
            raise KernelError(f"no interface '{ifname}' [ENODEV]", errno.ENODEV)
        return i

    def _release_links(self) -> None:
        """A link no pin and no open fd holds is released, and detaches (as in the kernel)."""
        held = set(self.fds.values())
        held |= {int(f.read_text()) for f in (self.root / "bpf").rglob(link.LINK_PIN)}
        for o in self.objs.values():
            if isinstance(o, Link) and o.ifindex and o.id not in held:
                self._unhook(o)

    def _unhook(self, lk: Link) -> None:
        if lk.hook == "xdp":
            self.xdp_links.pop(lk.ifindex, None)
        else:
            ids = self.tcx.get((lk.ifindex, lk.hook), [])
            if lk.id in ids:
                ids.remove(lk.id)
        lk.ifindex = 0

    def _xdp_now(self, index: int) -> attach.XdpState | None:
        self._release_links()
        lid = self.xdp_links.get(index)
        if lid is not None:
            return attach.XdpState("native", self.objs[lid].prog_id)
        return self.xdp.get(index)

    def _tcx_ids(self, index: int, d: str) -> list[int]:
        self._release_links()
        return [self.objs[lid].prog_id for lid in self.tcx.get((index, d), [])]

    # ---- programs and objects (Kernel and bpfsys) ----
    def load_program(self, source, defines, functions, device=None, netns=None, stored=False):
        self._call("load_program")
        self.loads.append(dict(defines))
        hook = "xdp" if any(t == "xdp" for t in functions.values()) else "tc"
        progs = {name: Fd(self, self._add(Prog(0, name[:15], PROG_TYPE[t])))
                 for name, t in functions.items()}
        shared = Path(defines["NB_SHARED_PIN"].strip('"')) if "NB_SHARED_PIN" in defines \
            else None
        maps = {}
        for name, (t, ks, vs, n) in program_maps(defines, hook).items():
            if shared is not None and name in SHARED_MAPS and (shared / name).exists():
                fd = self.obj_get(shared / name)            # BPF_TABLE_PINNED reuses it
            else:
                stride = (vs + 7) // 8 * 8 * self.cpus if t == PERCPU_ARRAY else vs
                fd = Fd(self, self._add(Map(0, name, t, ks, vs, n, stride, {},
                                            bytearray(stride * n) if t in ARRAYS else None)))
                if shared is not None and name in SHARED_MAPS:
                    shared.mkdir(parents=True, exist_ok=True)
                    self.obj_pin(fd, shared / name)         # and pins what it creates
            m = self._obj(fd)
            maps[name] = LoadedMap(name, fd, m.type, m.key_size, m.value_size, m.max_entries)
        return FakeLoaded(self, Path(source), progs, maps)

    def obj_get(self, path):
        self._call("obj_get")
        path = Path(path)
        try:
            obj_id = int(path.read_text())
        except (OSError, ValueError):
            raise KernelError(f"open pin {path}: no such file [ENOENT]", errno.ENOENT) from None
        return Fd(self, obj_id)

    def obj_pin(self, fd, path) -> None:
        self._call("obj_pin")
        path = Path(path)
        obj = self._obj(fd)
        if path.exists():
            raise KernelError(f"pin {path}: file exists [EEXIST]", errno.EEXIST)
        if not path.parent.is_dir():
            raise KernelError(f"pin {path}: no such directory [ENOENT]", errno.ENOENT)
        path.write_text(str(obj.id))

    def prog_fd_by_id(self, prog_id: int):
        self._call("prog_fd_by_id")
        if not isinstance(self.objs.get(prog_id), Prog):
            raise KernelError(f"program id {prog_id}: none [ENOENT]", errno.ENOENT)
        return Fd(self, prog_id)

    def prog_info(self, fd) -> ProgInfo:
        p = self._obj(fd, Prog)
        return ProgInfo(p.type, p.id, p.name, f"{p.id:016x}", 0, 0)

    def map_info(self, fd) -> MapInfo:
        m = self._obj(fd, Map)
        return MapInfo(m.type, m.id, m.key_size, m.value_size, m.max_entries, 0, m.name[:15])

    def num_possible_cpus(self) -> int:
        return self.cpus

    # ---- XDP and TC through netlink ----
    def xdp_state(self, ifname, netns=None):
        self._call("xdp_state")
        return self._xdp_now(self._index(ifname, netns))

    def attach_xdp(self, ifname, prog_fd, mode="auto", replace_prog_fd=None, netns=None):
        self._call("attach_xdp")
        index = self._index(ifname, netns)
        prog = self._obj(prog_fd, Prog)
        self._release_links()
        if index in self.xdp_links:
            raise KernelError(f"attach xdp to {ifname}: a link holds the hook [EBUSY]",
                              errno.EBUSY)
        cur = self.xdp.get(index)
        if replace_prog_fd is not None:
            want = self._obj(replace_prog_fd, Prog).id
            if cur is None or cur.prog_id != want:
                raise KernelError(f"attach xdp to {ifname}: expected program {want} [EEXIST]",
                                  errno.EEXIST)
        mode = "native" if mode == "auto" else mode
        if cur is not None and cur.mode != mode:
            raise KernelError(f"attach xdp to {ifname}: attached in {cur.mode} [EEXIST]",
                              errno.EEXIST)
        self.xdp[index] = attach.XdpState(mode, prog.id)
        return mode

    def detach_xdp(self, ifname, mode=None, prog_id=None, netns=None):
        self._call("detach_xdp")
        index = self._index(ifname, netns)
        cur = self.xdp.get(index)
        if cur is None or (prog_id is not None and cur.prog_id != prog_id) or \
                (mode is not None and cur.mode != mode):
            return False
        del self.xdp[index]
        return True

    def check_offload(self, ifname, netns=None):
        from netbpf.errors import NotSupported
        raise NotSupported(f"offload xdp to {ifname}: driver 'fake' cannot offload XDP "
                           "programs; use mode native or generic")

    def list_tc_filters(self, ifname, direction, netns=None):
        self._call("list_tc_filters")
        index = self._index(ifname, netns)
        ours = [self.tc[(index, direction)]] if (index, direction) in self.tc else []
        return list(self.foreign_tc.get((index, direction), [])) + ours

    def ensure_clsact(self, ifname, netns=None):
        self._call("ensure_clsact")
        index = self._index(ifname, netns)
        added = index not in self.clsact
        self.clsact.add(index)
        return added

    def attach_tc(self, ifname, direction, prog_fd, name, netns=None):
        self._call("attach_tc")
        index = self._index(ifname, netns)
        if index not in self.clsact:
            raise KernelError(f"attach tc to {ifname}: no clsact qdisc [EINVAL]", errno.EINVAL)
        prog = self._obj(prog_fd, Prog)
        self.tc[(index, direction)] = attach.TcFilter(direction, attach.NB_TC_PRIO,
                                                      attach.NB_TC_HANDLE, "bpf", 3, name,
                                                      prog.id, True)

    def detach_tc(self, ifname, direction, netns=None):
        self._call("detach_tc")
        return self.tc.pop((self._index(ifname, netns), direction), None) is not None

    def remove_clsact_if_unused(self, ifname, netns=None):
        self._call("remove_clsact_if_unused")
        index = self._index(ifname, netns)
        busy = [k for k in self.tc if k[0] == index] + \
            [k for k, fs in self.foreign_tc.items() if k[0] == index and fs]
        if index not in self.clsact or busy:
            return False
        self.clsact.discard(index)
        return True

    # ---- bpf_links ----
    def create_link(self, prog_fd, ifname, hook, mode=None, netns=None):
        self._call("create_link")
        if not self.links:
            raise link.LinkUnsupported("this (fake) kernel has no bpf_link for XDP or TCX")
        index = self._index(ifname, netns)
        prog = self._obj(prog_fd, Prog)
        self._release_links()
        if hook == "xdp":
            if index in self.xdp or index in self.xdp_links:
                raise KernelError(f"link xdp to {ifname}: hook busy [EBUSY]", errno.EBUSY)
            lid = self._add(Link(0, "xdp", prog.id, index, "xdp"))
            self.xdp_links[index] = lid
            return Fd(self, lid), "native" if mode in (None, "auto") else mode
        lid = self._add(Link(0, "tcx", prog.id, index, hook))
        self.tcx.setdefault((index, hook), []).append(lid)
        return Fd(self, lid), "tcx"

    def _pinned_link(self, path) -> Link:
        with self.obj_get(path) as fd:
            return self._obj(fd, Link)

    def update_pinned(self, path, new_prog_fd, old_prog_id, also_pin=None):
        self._call("update_pinned")
        lk = self._pinned_link(path)
        prog = self._obj(new_prog_fd, Prog)
        if lk.ifindex == 0:
            raise KernelError(f"update link {path}: detached [ENOLINK]", errno.ENOLINK)
        if old_prog_id is not None and lk.prog_id != old_prog_id:
            raise KernelError(f"update link {path}: runs {lk.prog_id} [EPERM]", errno.EPERM)
        lk.prog_id = prog.id
        if also_pin is not None:
            with self.obj_get(path) as fd:
                self.obj_pin(fd, also_pin)

    def detach_pinned(self, path):
        self._call("detach_pinned")
        if not Path(path).exists():
            return None
        lk = self._pinned_link(path)
        info = link.LinkInfo(lk.id, lk.kind, lk.prog_id, lk.ifindex)
        self._unhook(lk)
        return info

    def pinned_link_info(self, path):
        self._call("pinned_link_info")
        if not Path(path).exists():
            return None
        lk = self._pinned_link(path)
        return link.LinkInfo(lk.id, lk.kind, lk.prog_id, lk.ifindex)

    def tcx_prog_ids(self, ifname, direction, netns=None):
        self._call("tcx_prog_ids")
        return self._tcx_ids(self._index(ifname, netns), direction)

    # ---- interfaces and namespaces ----
    def ifindex(self, ifname, netns=None):
        self._call("ifindex")
        if netns and netns not in self.namespaces:
            raise KernelError(f"enter network namespace {netns}: none [ENOENT]", errno.ENOENT)
        return self.ifaces.get((netns, ifname))

    def netns_exists(self, netns):
        return netns in self.namespaces

    def forwarding(self, ifname, family, netns=None):
        return ifname not in self.forwarding_off

    def vip_problem(self, ifname, vip, netns=None):
        return None
