"""Kernel I/O: the only package that imports bcc, pyroute2 and libbpf (ctypes).

bpfsys (pins, map I/O), loader (bcc compile + load), testrun (BPF_PROG_TEST_RUN), link (XDP
and TCX bpf_links), attach (XDP and TC clsact via netlink, the fallback), reach (can clients
reach a VIP), netns (enter a network namespace only), api (the Kernel protocol the apply
engine calls, and the real implementation). No policy logic here.

Names are resolved on first use (PEP 562): importing one submodule, or this package for
its constants, does not load the others (an unchanged re-apply reads pins and state only).
"""

from __future__ import annotations

import importlib

_WHERE = {
    **dict.fromkeys(('NB_TC_HANDLE', 'NB_TC_PRIO', 'XDP_MODES', 'TcFilter', 'XdpState',
                     'attach_tc', 'attach_xdp', 'detach_tc', 'detach_xdp', 'driver_name',
                     'ensure_clsact', 'list_tc_filters', 'remove_clsact_if_unused', 'xdp_state'),
                    'attach'),
    **dict.fromkeys(('BPF_ANY', 'BPF_EXIST', 'BPF_NOEXIST', 'Fd', 'KernelError', 'MapInfo',
                     'ProgInfo', 'close', 'map_delete', 'map_delete_batch', 'map_get_fd_by_id',
                     'map_info', 'map_keys', 'map_lookup', 'map_lookup_batch',
                     'map_lookup_percpu', 'map_update', 'map_update_batch',
                     'num_possible_cpus', 'obj_get', 'obj_pin', 'percpu_value_size',
                     'prog_get_fd_by_id', 'prog_info'), 'bpfsys'),
    **dict.fromkeys(('Loaded', 'LoadedMap', 'clear_cache', 'load_program'), 'loader'),
    **dict.fromkeys(('enter_netns', 'netns_label', 'netns_name'), 'netns'),
    **dict.fromkeys(('TC_ACT_OK', 'TC_ACT_REDIRECT', 'TC_ACT_SHOT', 'TC_ACT_UNSPEC',
                     'XDP_ABORTED', 'XDP_DROP', 'XDP_PASS', 'XDP_REDIRECT', 'XDP_TX',
                     'TestRunResult', 'tc_verdict_name', 'test_run', 'xdp_verdict_name'),
                    'testrun'),
}


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'netbpf.kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"netbpf.kernel.{mod}"), name)
    globals()[name] = value
    return value


__all__ = list(_WHERE)
