"""Load test: mixed traffic through the gateway while a changed policy is applied every second.

    [client] client0 ------------------------------------- gw0 [gw]   (a private lab)
             trafgen, 400 pps: udp 9000 v4+v6 (counted),    XDP ingress: count udp 9000,
               udp 9001 (dropped), truncated IPv4            drop udp 9001, allow tcp 5001,
               (malformed)                                   + rules and a 64-address set that
             TCP to gw:5001 every 50 ms (echo)  <--------->  change on every apply
                                                             TC egress: count tcp sport 5001,
                                                             + a rule that changes
Every 5th apply adds 70 rules (a new, bigger program) and the next takes them away again.

What must hold: no TCP connection the policy allows fails; the counters of the unchanged rules
keep climbing across every apply; the kernel memory of netbpf's maps (fdinfo memlock of every
pinned map) stays bounded; every replaced program is gone from the kernel at the end.
About 25 s in CI (longer on a busy machine: the pace follows how long one apply takes there,
so a dozen applies always fall inside the traffic); NETBPF_SOAK=1 runs 10 minutes (`NETBPF_SOAK=1 pytest -s
tests/netns/test_soak.py` prints the numbers). A shorter test checks that counts are exact
across applies under traffic.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from netbpf.kernel import bpfsys
from netbpf.kernel.netns import enter_netns
from netbpf.store.state import pin_dir, staging_dirs

from netbpf_cli import netbpf
from test_races import status_row

SOAK = os.environ.get("NETBPF_SOAK") == "1"
DURATION = float(os.environ.get("NETBPF_SOAK_SECONDS") or (600 if SOAK else 20))
PPS = 400
TCP_PORT = 5001

SERVER = """
import socket, threading
def serve(c):
    with c:
        c.settimeout(5)
        while data := c.recv(4096):
            c.sendall(data)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d)); s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
""" % TCP_PORT


def policy(i: int) -> str:
    """Apply number i: the churn rules, the set and (every 5th) 70 more rules change."""
    churn = ", ".join(f"203.0.113.{(i * 7 + k) % 256}/32" for k in range(64))
    pad = "".join(f"        - {{name: pad-{k}, proto: tcp, dport: {20000 + k}, action: drop}}\n"
                  for k in range(70 if i % 5 == 4 else 0))
    return f"""\
version: 1
sets:
  churn: [{churn}]
interfaces:
  gw0:
    xdp: {{mode: native}}
    ingress:
      default: allow
      rules:
        - {{name: cnt-trafgen, proto: udp, dport: 9000, action: count}}
        - {{name: drop-9001, proto: udp, dport: 9001, action: drop}}
        - {{name: drop-churn, src: "@churn", action: drop}}
        - {{name: churn-{i}, proto: udp, dport: {10000 + i % 100}, action: drop}}
        - {{name: allow-tcp, proto: tcp, dport: {TCP_PORT}, action: allow}}
{pad}    egress:
      default: allow
      rules:
        - {{name: cnt-tcp-out, proto: tcp, sport: {TCP_PORT}, action: count}}
        - {{name: e-churn-{i}, proto: udp, dport: {11000 + i % 100}, action: drop}}
"""


def trafgen_config(lab) -> str:
    eth = f"eth(da={lab.mac('gw', 'gw0')}, sa={lab.mac('client', 'client0')}"
    v4 = f"ipv4(saddr={lab.addr('client', 'client0')}, daddr={lab.addr('gw', 'gw0')})"
    v6 = f"ipv6(saddr={lab.addr('client', 'client0', 6)}, daddr={lab.addr('gw', 'gw0', 6)})"
    return "\n".join([
        f"{{ {eth}), {v4}, udp(sp=40000, dp=9000), fill(0x41, 64) }}",
        f"{{ {eth}), {v4}, udp(sp=40000, dp=9001), fill(0x42, 64) }}",
        f"{{ {eth}), {v6}, udp(sp=40000, dp=9000), fill(0x43, 64) }}",
        f"{{ {eth}, type=0x0800), fill(0x45, 10) }}",      # 10 bytes of IPv4: malformed
    ]) + "\n"


class TcpLoop(threading.Thread):
    """Connect, send, read the echo, close; every 50 ms until stopped. Counts failures."""

    def __init__(self, lab):
        super().__init__(daemon=True)
        self.ns, self.dst = lab.ns("client"), lab.addr("gw", "gw0")
        self.ok, self.failed, self.slow = 0, [], []     # slow: (start, seconds) over 0.5 s
        self.stop = threading.Event()

    def run(self) -> None:
        with enter_netns(self.ns):     # this thread only: its sockets live in the client netns
            while not self.stop.wait(0.05):
                payload = os.urandom(64)
                t0 = time.monotonic()
                try:
                    with socket.create_connection((self.dst, TCP_PORT), timeout=3) as s:
                        s.sendall(payload)
                        got = b""
                        while len(got) < len(payload):
                            chunk = s.recv(4096)
                            if not chunk:
                                break
                            got += chunk
                    if got != payload:
                        raise OSError(f"echo returned {len(got)} of {len(payload)} bytes")
                    self.ok += 1
                    if time.monotonic() - t0 > 0.5:
                        self.slow.append((t0, time.monotonic() - t0))
                except OSError as e:
                    self.failed.append(f"{time.strftime('%H:%M:%S')} {e}")


def pinned_memlock(key: str) -> int:
    """Sum of fdinfo 'memlock' over every map pinned for key (each map once)."""
    by_id = {}
    for p in pin_dir(key).rglob("*"):
        if not p.is_file() or p.name in ("prog", "link"):
            continue
        with bpfsys.obj_get(p) as fd:
            info = dict(line.split(":\t", 1) for line in
                        Path(f"/proc/self/fdinfo/{int(fd)}").read_text().splitlines()
                        if ":\t" in line)
            by_id[int(info["map_id"])] = int(info["memlock"])
    return sum(by_id.values())


def warm_up(lab, path: Path) -> float:
    """Apply the big and the small policy (both programs compiled, the small one left in
    force); the slower of the two applies that follow, in seconds."""
    took = []
    for n in (4, 0, 4, 0):
        path.write_text(policy(n))
        t = time.monotonic()
        netbpf(lab, "apply", str(path))
        took.append(time.monotonic() - t)
    return max(took[2:])


def prog_exists(prog_id: int) -> bool:
    try:
        bpfsys.prog_get_fd_by_id(prog_id).close()
        return True
    except bpfsys.KernelError:
        return False


@pytest.fixture
def gw(make_lab):
    lab = make_lab("two-hosts")
    server = lab.popen("gw", [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    try:
        yield lab
    finally:
        netbpf(lab, "detach", "gw0", check=False)
        server.kill()
        server.wait()


def test_traffic_survives_an_apply_every_second(gw, tmp_path):
    lab = gw
    key = f"{lab.ns('gw')}:gw0"
    path = tmp_path / "soak.yaml"
    # one apply a second, or as often as this machine can (a busy CI machine takes longer
    # over one apply), and long enough for a dozen of them
    pace = max(1.0, 1.2 * warm_up(lab, path))
    duration = max(DURATION, 12 * pace)
    cfg = tmp_path / "trafgen.cfg"
    cfg.write_text(trafgen_config(lab))
    sent = int(PPS * duration) // 4 * 4          # whole rounds of the 4 frames
    # --no-sock-mem, -Q: do not retune the machine's socket memory or IRQ affinity
    trafgen = lab.popen("client", ["trafgen", "-o", "client0", "-i", str(cfg), "-n", str(sent),
                                   "-t", f"{1_000_000 // PPS}us", "-P", "1", "--no-sock-mem",
                                   "-Q", "-C"])
    tcp = TcpLoop(lab)
    tcp.start()
    samples, progs, applied = [], set(), []           # applied: (start, seconds, new programs)
    t0 = time.monotonic()
    try:
        i = 0
        while time.monotonic() - t0 < duration:
            i += 1
            path.write_text(policy(i))
            ta = time.monotonic()
            out = netbpf(lab, "apply", str(path)).stdout
            applied.append((ta - t0, time.monotonic() - ta, "loaded new programs" in out))
            s = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
            rules = {r["name"]: r["packets"] for r in s["rules"]}
            progs |= {p["prog_id"] for p in s["parts"].values()}
            samples.append((time.monotonic() - t0, rules["cnt-trafgen"], rules["drop-9001"],
                            rules["allow-tcp"], rules["cnt-tcp-out"],
                            s["parts"]["ingress"]["totals"]["malformed"]["packets"],
                            pinned_memlock(key), i % 5 == 4))
            time.sleep(max(0.0, t0 + i * pace - time.monotonic()))
    finally:
        tcp.stop.set()
        tcp.join(10)
        try:
            trafgen.wait(duration / 2 + 10)        # -n: it ends once all are sent
        finally:
            trafgen.kill()
            trafgen.wait()
    time.sleep(0.3)                    # packets in flight, deferred frees of old programs
    final = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    counted = {r["name"]: r["packets"] for r in final["rules"]}
    current = {p["prog_id"] for p in final["parts"].values()}
    leaked = [p for p in progs - current if prog_exists(p)]
    lost = sent // 2 - counted["cnt-trafgen"]       # half the frames are udp 9000
    small = [m for *_, m, wide in samples if not wide]
    big = [m for *_, m, wide in samples if wide]
    half = len(small) // 2
    took = [d for _, d, _ in applied]
    stalls = [(round(start - t0, 1), round(d, 2), [(round(a, 1), new) for a, ad, new in applied
                                                 if a < start - t0 + d and start - t0 < a + ad])
              for start, d in tcp.slow]
    report = (f"{duration:.0f} s, one apply every {pace:.1f} s: {len(applied)} applies ({sum(n for *_, n in applied)} loaded "
              f"new programs; apply took {min(took):.2f}-{max(took):.2f} s, mean "
              f"{sum(took) / len(took):.2f} s); TCP {tcp.ok} ok / {len(tcp.failed)} failed, "
              f"{len(tcp.slow)} slower than 0.5 s (longest "
              f"{max((d for _, d in tcp.slow), default=0):.2f} s); trafgen udp 9000 counted "
              f"{counted['cnt-trafgen']} of {sent // 2} sent ({lost} lost); map memlock {min(small)}-"
              f"{max(small)} B (70 more rules: {min(big, default=0)}-{max(big, default=0)} B)")
    print("\nsoak:", report)
    print("connections slower than 0.5 s (start, seconds, overlapping applies (start, new "
          "programs)):", stalls)

    assert tcp.failed == [], f"{report}\nfailed connections: {tcp.failed[:10]}"
    assert tcp.ok >= duration * 5, report
    assert trafgen.returncode == 0, f"trafgen did not send its {sent} frames in time\n{report}"
    assert lost >= 0, report           # exactness: test_counters_..._under_traffic below
    for col, name in ((1, "cnt-trafgen"), (2, "drop-9001"), (3, "allow-tcp"),
                      (4, "cnt-tcp-out"), (5, "malformed")):
        # over every 2 s window: a sample at most 1 s apart from the next could fall into a
        # pause of the TCP loop on this busy machine without anything being wrong
        stuck = []
        for k, a in enumerate(samples):
            b = next((b for b in samples[k + 1:] if b[0] - a[0] >= 2.0), None)
            if b is not None and b[col] <= a[col]:
                stuck.append((round(a[0], 1), a[col]))
        assert not stuck, (f"{name} did not grow for 2 s after (time, value) {stuck}\n{report}"
                           f"\nslow TCP connections: {stalls}")
    assert max(small[half:]) <= max(small[:half]) * 1.05, f"map memory grows: {small}\n{report}"
    if big:
        assert max(big) <= min(big) * 1.05, f"map memory of the big program grows: {big}"
    assert leaked == [], f"replaced programs still in the kernel: {leaked}"
    assert [d for d in staging_dirs(key) if d.exists()] == []
    assert status_row(lab)["health"] == "ok"


LOSES_COUNTS = ()  # fixed: was a strict xfail


@pytest.mark.parametrize("change", ["rules", pytest.param("programs", marks=LOSES_COUNTS)])
def test_counters_miss_nothing_across_applies_under_traffic(gw, tmp_path, change):
    """1000 counted frames at 200/s while applying: 'rules' rewrites maps only, 'programs'
    switches between two program shapes each time. Every frame must be counted once."""
    lab = gw
    path = tmp_path / "p.yaml"
    # enough frames for at least three applies during the traffic, however long one takes here
    slowest = warm_up(lab, path)
    cfg = tmp_path / "trafgen.cfg"
    cfg.write_text(trafgen_config(lab))
    sent = max(2000, int(PPS * 4 * slowest)) // 4 * 4
    trafgen = lab.popen("client", ["trafgen", "-o", "client0", "-i", str(cfg), "-n", str(sent),
                                   "-t", f"{1_000_000 // PPS}us", "-P", "1", "--no-sock-mem",
                                   "-Q", "-C"])
    i, news = 0, 0
    try:
        while trafgen.poll() is None:
            i += 1
            # policy(4) has 70 more rules: switching to or from it loads new programs
            n = (4 if i % 2 else 0) if change == "programs" else (i if i % 5 != 4 else i + 1)
            path.write_text(policy(n))
            news += "loaded new programs" in netbpf(lab, "apply", str(path)).stdout
        assert trafgen.wait(sent / PPS + 30) == 0
    finally:
        trafgen.kill()
        trafgen.wait()
    time.sleep(0.2)
    rules = {r["name"]: r for r in json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
             ["rules"]}
    assert (news > 0) == (change == "programs") and i >= 2, (i, news)
    assert rules["cnt-trafgen"]["packets"] == sent // 2, (
        f"{i} applies ({news} new programs): counted {rules['cnt-trafgen']['packets']} "
        f"of {sent // 2}")
    assert rules["drop-9001"]["packets"] == sent // 4
