"""Bad policies and the exact errors they give: FILE:LINE:COL: path: message.

One table row per mistake a person makes; each asserts the complete error list, so a position
or wording change shows up here. Valid-policy behaviour is in test_policy_models.py.
"""
from __future__ import annotations

import textwrap

import pytest

from netbpf.errors import PolicyError
from netbpf.policy import load_policy

RULE_PREFIX = "version: 1\ninterfaces:\n  eth0:\n    ingress:\n      rules:\n"


def rules(*lines: str) -> str:
    """A policy with the given rule lines (each '- {...}') on eth0 ingress; rule 0 is line 6."""
    return RULE_PREFIX + "".join(f"        {line}\n" for line in lines)


COUNT_RULES = rules(*(f"- {{name: c{i}, proto: tcp, dport: {i + 1}, action: count}}"
                      for i in range(65)))

# (id, policy text, {extra file: text}, expected error lines)
CASES = [
    ("port_out_of_range",
     rules("- {name: web, proto: tcp, dport: 80, action: allow}",
           "- {name: ssh, proto: tcp, dport: 22, action: allow}",
           "- {name: big, proto: tcp, dport: 70000, action: drop}"), {},
     ["p.yaml:8:42: interfaces.eth0.ingress.rules[2].dport: must be 0-65535 (got 70000)"]),
    ("port_range_reversed_in_list",
     rules("- {name: r, proto: udp, dport: [53, '2000-1000'], action: drop}"), {},
     ["p.yaml:6:45: interfaces.eth0.ingress.rules[0].dport[1]: '2000-1000': range start "
      "2000 is above its end 1000"]),
    ("port_not_a_number",
     rules("- {name: r, proto: udp, sport: http, action: drop}"), {},
     ["p.yaml:6:40: interfaces.eth0.ingress.rules[0].sport: 'http' is not a port or a "
      "'lo-hi' port range"]),
    ("host_bits_set",
     rules("- {name: r, src: 10.0.0.1/24, action: drop}"), {},
     ["p.yaml:6:26: interfaces.eth0.ingress.rules[0].src: '10.0.0.1/24' has host bits set "
      "(did you mean 10.0.0.0/24?)"]),
    ("bad_address_in_list",
     rules("- {name: r, dst: [10.0.0.0/8, 10.0.0.300], action: drop}"), {},
     ["p.yaml:6:39: interfaces.eth0.ingress.rules[0].dst[1]: '10.0.0.300' is not a valid "
      "address or network"]),
    ("unknown_set",
     "version: 1\nsets:\n  admins: [10.0.0.0/24]\n" + rules(
         "- {name: r, src: '@admin', action: allow}",
         "- {name: s, src: '@admins', action: allow}").removeprefix("version: 1\n"), {},
     ["p.yaml:8:26: interfaces.eth0.ingress.rules[0].src: unknown set '@admin' "
      "(sets: admins)"]),
    ("duplicate_rule_name_across_directions",
     rules("- {name: web, proto: tcp, dport: 80, action: allow}")
     + "    egress:\n      rules:\n        - {name: web, proto: tcp, dport: 443, action: drop}\n",
     {}, ["p.yaml:9:18: interfaces.eth0.egress.rules[0].name: duplicate rule name 'web' on "
          "eth0 (first at line 6)"]),
    ("ipv4_src_ipv6_dst",
     rules("- {name: r, src: 10.0.0.0/8, dst: '2001:db8::1', action: drop}"), {},
     ["p.yaml:6:43: interfaces.eth0.ingress.rules[0].dst: src is IPv4 and dst is IPv6: "
      "no packet can match both"]),
    ("icmp_with_ipv6_address",
     rules("- {name: p, proto: icmp, icmp_type: echo-request, src: '2001:db8::/32', "
           "action: allow}"), {},
     ["p.yaml:6:64: interfaces.eth0.ingress.rules[0].src: src is IPv6 but proto icmp is "
      "IPv4-only (use proto icmpv6)"]),
    ("set_family_conflict",
     "version: 1\nsets:\n  v6only: ['2001:db8::/32']\n" + rules(
         "- {name: r, src: '@v6only', dst: 10.0.0.1, action: drop}").removeprefix("version: 1\n"),
     {}, ["p.yaml:8:42: interfaces.eth0.ingress.rules[0].dst: src is IPv6 and dst is IPv4: "
          "no packet can match both"]),
    ("ports_with_icmp",
     rules("- {name: r, proto: icmp, dport: 80, action: drop}"), {},
     ["p.yaml:6:41: interfaces.eth0.ingress.rules[0].dport: ports match only tcp and udp "
      "(proto is icmp)"]),
    ("icmp_type_with_tcp",
     rules("- {name: r, proto: tcp, icmp_type: echo-request, action: drop}"), {},
     ["p.yaml:6:44: interfaces.eth0.ingress.rules[0].icmp_type: icmp_type needs proto icmp "
      "or icmpv6 (proto is tcp)"]),
    ("icmpv6_name_with_proto_icmp",
     rules("- {name: r, proto: icmp, icmp_type: packet-too-big, action: allow}"), {},
     ["p.yaml:6:45: interfaces.eth0.ingress.rules[0].icmp_type: 'packet-too-big' is an "
      "ICMPv6 type, not ICMP: use proto icmpv6, or one of echo-reply, dest-unreachable, "
      "source-quench, redirect, echo-request, router-advertisement, router-solicitation, "
      "time-exceeded, parameter-problem, timestamp-request, timestamp-reply"]),
    ("icmp_code_without_type",
     rules("- {name: r, proto: icmp, icmp_code: 3, action: drop}"), {},
     ["p.yaml:6:45: interfaces.eth0.ingress.rules[0].icmp_code: icmp_code needs icmp_type"]),
    ("tcp_flags_with_udp",
     rules("- {name: r, proto: udp, tcp_flags: syn, action: drop}"), {},
     ["p.yaml:6:44: interfaces.eth0.ingress.rules[0].tcp_flags: tcp_flags needs proto tcp "
      "(proto is udp)"]),
    ("unknown_tcp_flag",
     rules("- {name: r, proto: tcp, tcp_flags: 'syn,!akc', action: drop}"), {},
     ["p.yaml:6:44: interfaces.eth0.ingress.rules[0].tcp_flags: unknown TCP flag 'akc': use "
      "fin, syn, rst, psh, ack, urg, ece, cwr, each optionally prefixed with '!' "
      "(must be clear)"]),
    ("unknown_action",
     rules("- {name: r, action: refuse}"), {},
     ["p.yaml:6:29: interfaces.eth0.ingress.rules[0].action: must be allow, drop, reject, "
      "count or {rate_limit: ...} (got 'refuse')"]),
    ("rate_limit_bad_values",
     rules("- name: r", "  action:", "    rate_limit: {pps: 0, per: host}"), {},
     ["p.yaml:8:31: interfaces.eth0.ingress.rules[0].action.rate_limit.pps: must be "
      "1-1000000000 (got 0)",
      "p.yaml:8:39: interfaces.eth0.ingress.rules[0].action.rate_limit.per: must be src or "
      "rule (got 'host')"]),
    ("unknown_key_with_suggestion",
     rules("- {name: r, proto: tcp, dprot: 22, action: allow}"), {},
     ["p.yaml:6:33: interfaces.eth0.ingress.rules[0].dprot: unknown key 'dprot' "
      "(did you mean 'dport'?)"]),
    ("missing_action_points_at_rule",
     rules("- name: r", "  proto: tcp"), {},
     ["p.yaml:6:11: interfaces.eth0.ingress.rules[0]: missing required key 'action'"]),
    ("empty_value_is_not_any",
     rules("- name: r", "  dport:", "  action: drop"), {},
     ["p.yaml:7:11: interfaces.eth0.ingress.rules[0].dport: has no value; give one or "
      "remove the key"]),
    ("set_reference_inside_list",
     "version: 1\nsets:\n  a: [10.0.0.0/8]\n" + rules(
         "- {name: r, src: ['@a', 192.0.2.1], action: drop}").removeprefix("version: 1\n"), {},
     ["p.yaml:8:27: interfaces.eth0.ingress.rules[0].src[0]: a set reference must stand "
      "alone (write '@a' instead of a list)"]),
    ("bad_interface_names",
     "version: 1\ninterfaces:\n  eth0:1: {}\n  this-name-is-too-long: {}\n", {},
     ["p.yaml:3:3: interfaces['eth0:1']: 'eth0:1' is not a valid interface name: Linux names "
      "are 1-15 characters without '/', ':' or whitespace",
      "p.yaml:4:3: interfaces.this-name-is-too-long: 'this-name-is-too-long' is not a valid "
      "interface name (21 bytes): Linux names are 1-15 characters without '/', ':' or "
      "whitespace"]),
    ("bad_xdp_mode_and_yaml11_bool",
     "version: 1\ninterfaces:\n  eth0:\n    xdp: {mode: turbo}\n    conntrack: yes\n", {},
     ["p.yaml:4:17: interfaces.eth0.xdp.mode: must be auto, native, generic or offload "
      "(got 'turbo')",
      "p.yaml:5:16: interfaces.eth0.conntrack: must be true, false or a mapping with timeouts (got 'yes')"]),
    ("rules_directly_under_interface",
     "version: 1\ninterfaces:\n  eth0:\n    rules: []\n", {},
     ["p.yaml:4:5: interfaces.eth0.rules: unknown key 'rules': it goes under 'ingress:' or "
      "'egress:'"]),
    ("missing_version", "interfaces: {}\n", {},
     ["p.yaml:1:1: missing required key 'version' (add 'version: 1' at the top)"]),
    ("wrong_version", "version: 2\n", {},
     ["p.yaml:1:10: version: unsupported policy version 2; this netbpf reads version 1"]),
    ("not_a_mapping", "- version: 1\n", {},
     ["p.yaml:1:1: a policy must be a mapping starting with 'version: 1' (got a list)"]),
    ("yaml_syntax_error", "version: 1\ninterfaces:\n  eth0: {ingress: {rules: [}}\n", {},
     ["p.yaml:3:28: invalid YAML: while parsing a flow node expected the node content, but "
      "found '}'"]),
    ("tab_indentation", "version: 1\ninterfaces:\n\teth0: {}\n", {},
     ["p.yaml:3:1: invalid YAML: while scanning for the next token found character '\\t' "
      "that cannot start any token (indent with spaces, not tabs)"]),
    ("duplicate_key", "version: 1\ninterfaces:\n  eth0: {}\n  eth1: {}\n  eth0: {}\n", {},
     ["p.yaml:5:3: duplicate key 'eth0' (first at line 3)"]),
    ("unquoted_bang_is_a_tag",
     rules("- name: r", "  proto: tcp", "  tcp_flags: !ack", "  action: drop"), {},
     ["p.yaml:8:22: unsupported YAML tag '!ack'; quote values that start with '!' "
      "(e.g. \"!ack\")"]),
    ("two_documents", "version: 1\n---\nversion: 1\n", {},
     ["p.yaml:2:1: more than one YAML document ('---'); a policy is one document"]),
    ("empty_file", "", {}, ["p.yaml:1:1: the file is empty; a policy starts with 'version: 1'"]),
    ("not_utf8", "version: 1\n# caf\xe9\n", {},
     ["p.yaml:2:6: not valid UTF-8 (byte 0xe9); save the file as UTF-8"]),
    ("bad_inline_set_entries",
     "version: 1\nsets:\n  a: [10.0.0.0/8, 10.0.0.0/33, '2001:db8::/129', nonsense]\n", {},
     ["p.yaml:3:19: sets.a[1]: '10.0.0.0/33': prefix length must be 0-32 for IPv4",
      "p.yaml:3:32: sets.a[2]: '2001:db8::/129': prefix length must be 0-128 for IPv6",
      "p.yaml:3:50: sets.a[3]: 'nonsense' is not a valid address or network"]),
    ("bad_set_file_lines",
     "version: 1\nsets:\n  bl: {file: bl.txt}\n",
     {"bl.txt": "# header\n10.0.0.0/8\n\nnonsense\n2001:db8::1/64  # comment\n"},
     ["bl.txt:4:1: sets.bl: 'nonsense' is not a valid address or network",
      "bl.txt:5:1: sets.bl: '2001:db8::1/64' has host bits set (did you mean 2001:db8::/64?)"]),
    ("missing_set_file",
     "version: 1\nsets:\n  bl: {file: nowhere.txt}\n", {},
     ["p.yaml:3:14: sets.bl.file: cannot read set file 'nowhere.txt': No such file or directory"]),
    ("lb_backend_wrong_family",
     "version: 1\nload_balancers:\n  web:\n    interface: eth0\n    vip: 10.0.0.100\n"
     "    port: 80\n    proto: tcp\n    backends:\n      - {address: 10.1.0.11}\n"
     "      - {address: '2001:db8::11'}\n", {},
     ["p.yaml:10:19: load_balancers.web.backends[1].address: IPv6 backend 2001:db8::11 for "
      "an IPv4 VIP; backends must be the VIP's family"]),
    ("lb_overlapping_vip",
     "version: 1\nload_balancers:\n"
     "  web: {interface: eth0, vip: 10.0.0.100, port: 80, proto: tcp, "
     "backends: [{address: 10.1.0.11}]}\n"
     "  web-again: {interface: eth1, vip: 10.0.0.100, port: 80, proto: tcp, "
     "backends: [{address: 10.1.0.12}]}\n", {},
     ["p.yaml:4:37: load_balancers.web-again.vip: VIP 10.0.0.100 port 80/tcp is already "
      "served by load balancer 'web' (at line 3)"]),
    ("lb_table_size_not_prime",
     "version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.100, port: 80, "
     "proto: tcp, table_size: 65536, backends: [{address: 10.1.0.11}]}\n", {},
     ["p.yaml:3:77: load_balancers.web.table_size: must be a prime number (got 65536; "
      "try 65537)"]),
    ("lb_dsr_changes_port",
     "version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.100, port: 80, "
     "proto: tcp, mode: dsr, backends: [{address: 10.1.0.11, port: 8080}]}\n", {},
     ["p.yaml:3:114: load_balancers.web.backends[0].port: dsr only rewrites the MAC address, "
      "so the backend port must be the VIP port 80 (got 8080); use mode nat to change ports"]),
    ("lb_idle_timeout_out_of_range",
     "version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.100, port: 53, "
     "proto: udp, idle_timeout: 500ms, backends: [{address: 10.1.0.11}]}\n", {},
     ["p.yaml:3:79: load_balancers.web.idle_timeout: must be between 1s and 7d (got '500ms')"]),
    ("lb_idle_timeout_not_a_duration",
     "version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.100, port: 80, "
     "proto: tcp, idle_timeout: soon, backends: [{address: 10.1.0.11}]}\n", {},
     ["p.yaml:3:79: load_balancers.web.idle_timeout: must be a duration like 30s, 15m or 2h "
      "(got 'soon')"]),
    ("lb_several_field_errors",
     "version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.100/32, port: 0, "
     "proto: icmp, backends: []}\n", {},
     ["p.yaml:3:31: load_balancers.web.vip: '10.0.0.100/32' must be a single address, not a "
      "network",
      "p.yaml:3:52: load_balancers.web.port: must be 1-65535 (got 0)",
      "p.yaml:3:62: load_balancers.web.proto: must be tcp or udp (got 'icmp')",
      "p.yaml:3:78: load_balancers.web.backends: must not be empty"]),
    ("too_many_count_rules", COUNT_RULES, {},
     ["p.yaml:70:11: interfaces.eth0.ingress.rules[64]: more than 64 count rules on "
      "interfaces.eth0.ingress: the data plane counts at most that many per direction "
      "(NB_MAX_COUNT_RULES)"]),
    ("too_many_set_references",
     "version: 1\nsets: {a: [10.0.0.1], b: [10.0.0.2], c: [10.0.0.3]}\n" + rules(
         "- {name: r1, src: '@a', action: drop}", "- {name: r2, dst: '@a', action: drop}",
         "- {name: r3, src: '@b', action: drop}", "- {name: r4, src: '@a', action: drop}",
         "- {name: r5, dst: '@b', action: drop}", "- {name: r6, src: '@c', action: drop}",
     ).removeprefix("version: 1\n"), {},
     ["p.yaml:12:27: interfaces.eth0.ingress.rules[5].src: '@c' as src is set reference "
      "number 5 on interfaces.eth0.ingress: the data plane looks up at most 4 distinct "
      "(set, src/dst) pairs per direction (NB_MAX_SETREFS)"]),
    ("every_error_at_once",
     "version: 1\nsets:\n  a: [10.0.0.0/8]\n" + rules(
         "- {name: x, proto: tcp, dport: 99999, action: drop}",
         "- {name: y, src: '@b', action: drop}",
         "- {name: y, proto: udp, action: drop}").removeprefix("version: 1\n")
     + "load_balancers:\n  web: {interface: eth0, vip: 10.0.0.1, port: 80, proto: tcp, "
       "backends: [{address: 10.0.0.1}]}\n", {},
     ["p.yaml:8:40: interfaces.eth0.ingress.rules[0].dport: must be 0-65535 (got 99999)",
      "p.yaml:9:26: interfaces.eth0.ingress.rules[1].src: unknown set '@b' (sets: a)",
      "p.yaml:10:18: interfaces.eth0.ingress.rules[2].name: duplicate rule name 'y' on eth0 "
      "(first at line 9)",
      "p.yaml:12:84: load_balancers.web.backends[0].address: backend 10.0.0.1 is the VIP "
      "itself"]),
]


@pytest.mark.parametrize("text,files,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_policy_reports_exact_position_and_message(tmp_path, monkeypatch, text, files,
                                                       expected):
    (tmp_path / "p.yaml").write_bytes(text.encode("latin-1" if "\xe9" in text else "utf-8"))
    for name, content in files.items():
        (tmp_path / name).write_text(textwrap.dedent(content))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as info:
        load_policy("p.yaml")
    assert info.value.errors == expected


def test_table_has_at_least_twenty_distinct_mistakes():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20


def test_policy_error_message_is_all_lines(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(rules("- {name: r, proto: icmp, dport: 80, action: drop}",
                          "- {name: s, action: nope}"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == "\n".join(info.value.errors)
    assert len(info.value.errors) == 2
    assert all(line.startswith(f"{path}:") for line in info.value.errors)
