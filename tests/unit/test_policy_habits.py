"""Messages for habits people bring from iptables/nft and from YAML: each names what to write
instead. One case per habit from issue 16; the message is checked whole where it is ours."""
from __future__ import annotations

import textwrap

import pytest

from netbpf.errors import PolicyError
from netbpf.policy import load_policy


def errors(tmp_path, text: str) -> list[str]:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return [e.split(": ", 1)[1] for e in info.value.errors]


def rule(tmp_path, body: str) -> list[str]:
    return errors(tmp_path, f"""\
        version: 1
        interfaces:
          eth0:
            ingress:
              rules:
                - {body}
        """)


def test_comma_separated_networks_suggest_a_list(tmp_path):
    got = rule(tmp_path, '{name: r, src: "10.0.0.0/8,192.168.0.0/16", action: drop}')
    assert got == ["interfaces.eth0.ingress.rules[0].src: '10.0.0.0/8,192.168.0.0/16' is "
                   "several networks in one string; write them as a list: "
                   "[10.0.0.0/8, 192.168.0.0/16]"]


def test_comma_inside_a_flow_mapping_suggests_a_list(tmp_path):
    got = rule(tmp_path, "{name: r, src: 10.0.0.0/8,192.168.0.0/16, action: drop}")
    assert len(got) == 1 and "a comma ends a value" in got[0]
    assert "src: [10.0.0.0/8, 192.168.0.0/16]" in got[0]


@pytest.mark.parametrize("word, says", [
    ("accept", "iptables' ACCEPT / nft's accept is 'allow' here"),
    ("return", "there are no chains to return from"),
    ("DROP", "actions are lower case: drop"),
])
def test_iptables_action_words_name_the_netbpf_one(tmp_path, word, says):
    got = rule(tmp_path, f"{{name: r, action: {word}}}")
    assert len(got) == 1
    assert got[0].startswith("interfaces.eth0.ingress.rules[0].action: must be allow, drop, "
                             "reject, count or {rate_limit: ...} (got ")
    assert says in got[0]


def test_quoted_version_says_to_drop_the_quotes(tmp_path):
    got = errors(tmp_path, 'version: "1"\ninterfaces: {}\n')
    assert got == ["version: must be the number 1, not the string '1': write 'version: 1' "
                   "without quotes"]


def test_conntrack_timeout_key_lists_the_real_ones(tmp_path):
    got = errors(tmp_path, """\
        version: 1
        interfaces:
          eth0:
            conntrack: {timeouts: {tcp: 5}}
        """)
    assert got == ["interfaces.eth0.conntrack.timeouts.tcp: unknown key 'tcp': conntrack "
                   "timeouts are per protocol and state: tcp_syn, tcp_established, tcp_close, "
                   "udp, icmp (e.g. timeouts: {tcp_established: 5})"]
    assert "did you mean 'tcp'" not in got[0]


def test_unquoted_ipv6_list_item_ending_in_colons_says_to_quote_it(tmp_path):
    got = errors(tmp_path, """\
        version: 1
        sets:
          v6:
            - 2001:db8::
        interfaces:
          eth0:
            ingress:
              rules:
                - {name: r, src: "@v6", action: drop}
        """)
    assert got == ["sets.v6[0]: must be an address or network (got a mapping: YAML read the "
                   "unquoted IPv6 address '2001:db8::' as a key; quote it: \"2001:db8::\")"]


def test_yaml_indentation_error_is_said_plainly(tmp_path):
    got = rule(tmp_path, "name: r\n               action: drop")
    assert len(got) == 1 and got[0].startswith("invalid YAML: bad indentation")
    assert "<block end>" not in got[0] and "block mapping" not in got[0]
