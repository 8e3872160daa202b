"""The pure rules of egress sandboxes: addresses, names, answers, and the nftables text."""

from __future__ import annotations

import ssl
from dataclasses import replace

import pytest
from inline_snapshot import snapshot

from nspawn_mcp.backend.egress import (
    allocate_subnet,
    base_ruleset,
    domain_allowed,
    egress_interfaces_in,
    endpoints,
    host_interface,
    parse_sni,
    reachable_answer,
    resolved_addresses,
    sandbox_rules,
    sandbox_rules_removal,
)
from nspawn_mcp.policy import CreateRequest, Policy, PolicyError, resolve_create
from nspawn_mcp.policy.loader import load_policy_text

EGRESS = Policy.model_validate(
    {
        "network": {
            "mode": "egress",
            "allow": [{"cidr": "203.0.113.0/24", "ports": [443, 80]}],
            "domains": ["pypi.org", "*.pythonhosted.org"],
            "domain_ports": [443],
        }
    }
)
_EGRESS_PLAN = resolve_create("egress", EGRESS, CreateRequest(), cwd="/srv").egress
assert _EGRESS_PLAN is not None
PLAN = replace(_EGRESS_PLAN, subnet="10.213.0.4/30")


def test_subnets_are_the_first_free_slash_30() -> None:
    assert allocate_subnet([]) == "10.213.0.0/30"
    assert allocate_subnet(["10.213.0.0/30", "10.213.0.8/30"]) == "10.213.0.4/30"
    assert endpoints("10.213.0.4/30") == ("10.213.0.5", "10.213.0.6")
    assert host_interface("sbx-0123abcd") == "ve-sbx-0123abcd"


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("pypi.org", True),
        ("PyPI.org.", True),
        ("files.pythonhosted.org", True),
        ("a.b.pythonhosted.org.", True),
        ("pythonhosted.org", False),
        ("evilpypi.org", False),
        ("pypi.org.evil.example", False),
        ("secret-data.pypi.org", False),
    ],
)
def test_only_listed_names_resolve(name: str, allowed: bool) -> None:
    assert domain_allowed(name, ("pypi.org", "*.pythonhosted.org")) is allowed


@pytest.mark.parametrize(
    ("address", "public_only", "private_allowed"),
    [
        ("151.101.0.223", True, True),
        ("10.1.2.3", False, True),
        ("192.168.1.1", False, True),
        ("100.64.0.1", False, True),
        ("169.254.169.254", False, False),
        ("127.0.0.1", False, False),
        ("10.213.0.6", False, False),
        ("224.0.0.1", False, False),
        ("0.0.0.0", False, False),
        ("2606:4700::1111", False, False),
    ],
)
def test_resolved_addresses_are_filtered(address: str, public_only: bool, private_allowed: bool) -> None:
    assert reachable_answer(address, private_allowed=False) is public_only
    assert reachable_answer(address, private_allowed=True) is private_allowed


def test_the_ruleset_is_pinned() -> None:
    assert base_ruleset() == snapshot(
        """\
add table inet nspawn_mcp
add map inet nspawn_mcp sandbox_egress { type ifname : verdict; }
add map inet nspawn_mcp sandbox_sni { type ifname : verdict; }
add chain inet nspawn_mcp prerouting { type nat hook prerouting priority dstnat; policy accept; }
add chain inet nspawn_mcp input { type filter hook input priority filter; policy accept; }
add chain inet nspawn_mcp forward { type filter hook forward priority filter; policy accept; }
add chain inet nspawn_mcp postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule inet nspawn_mcp input iifname "ve-sbx-*" ip daddr 10.213.0.0/16 udp dport 53 accept
add rule inet nspawn_mcp input iifname "ve-sbx-*" ip daddr 10.213.0.0/16 tcp dport 53 accept

add rule inet nspawn_mcp input iifname "ve-sbx-*" ip daddr 10.213.0.0/16 tcp dport 3129 accept
add rule inet nspawn_mcp input iifname "ve-sbx-*" ct state established,related accept
add rule inet nspawn_mcp input iifname "ve-sbx-*" drop
add rule inet nspawn_mcp forward oifname "ve-sbx-*" ct state established,related accept
add rule inet nspawn_mcp forward oifname "ve-sbx-*" drop
add rule inet nspawn_mcp forward iifname "ve-sbx-*" ip daddr 10.213.0.0/16 drop
add rule inet nspawn_mcp forward iifname "ve-sbx-*" meta nfproto ipv4 iifname vmap @sandbox_egress
add rule inet nspawn_mcp forward iifname "ve-sbx-*" drop
add rule inet nspawn_mcp prerouting iifname "ve-sbx-*" meta nfproto ipv4 iifname vmap @sandbox_sni
add rule inet nspawn_mcp postrouting ip saddr 10.213.0.0/16 oifname != "ve-sbx-*" masquerade
"""
    )
    assert sandbox_rules("sbx-0123abcd", PLAN) == snapshot("""\
add set inet nspawn_mcp resolved_0123abcd { type ipv4_addr; flags timeout; }
add chain inet nspawn_mcp egress_0123abcd
add chain inet nspawn_mcp sni_0123abcd
add rule inet nspawn_mcp egress_0123abcd ip daddr 203.0.113.0/24 tcp dport { 80, 443 } accept
add rule inet nspawn_mcp sni_0123abcd ip daddr 203.0.113.0/24 tcp dport { 80, 443 } return
add rule inet nspawn_mcp sni_0123abcd ip daddr @resolved_0123abcd tcp dport { 443 } dnat ip to 10.213.0.5:3129
add element inet nspawn_mcp sandbox_egress { "ve-sbx-0123abcd" : jump egress_0123abcd }
add element inet nspawn_mcp sandbox_sni { "ve-sbx-0123abcd" : jump sni_0123abcd }
""")
    assert sandbox_rules_removal("sbx-0123abcd") == snapshot(
        [
            'delete element inet nspawn_mcp sandbox_egress { "ve-sbx-0123abcd" }\n',
            'delete element inet nspawn_mcp sandbox_sni { "ve-sbx-0123abcd" }\n',
            "delete chain inet nspawn_mcp egress_0123abcd\n",
            "delete chain inet nspawn_mcp sni_0123abcd\n",
            "delete set inet nspawn_mcp resolved_0123abcd\n",
        ]
    )
    assert resolved_addresses("sbx-0123abcd", ["151.101.0.223"], 30) == snapshot(
        "add element inet nspawn_mcp resolved_0123abcd { 151.101.0.223 timeout 60s }\n"
    )


def test_egress_settings_need_egress_mode_and_valid_domains() -> None:
    with pytest.raises(PolicyError, match=r"need network.mode = 'egress'"):
        load_policy_text('[network]\ndomains = ["pypi.org"]\n', "p.toml")
    with pytest.raises(PolicyError, match=r"invalid domain"):
        load_policy_text('[network]\nmode = "egress"\ndomains = ["*evil*"]\n', "p.toml")
    with pytest.raises(PolicyError, match=r"network.allow.0.cidr"):
        load_policy_text('[network]\nmode = "egress"\nallow = [{ cidr = "nope", ports = [1] }]\n', "p.toml")
    with pytest.raises(PolicyError, match=r"only IPv4"):
        load_policy_text(
            '[network]\nmode = "egress"\nallow = [{ cidr = "2001:db8::/32", ports = [443] }]\n', "p"
        )
    with pytest.raises(PolicyError, match=r"between 1 and 65535"):
        load_policy_text(
            '[network]\nmode = "egress"\nallow = [{ cidr = "1.2.3.4/32", ports = [0] }]\n', "p.toml"
        )


def test_no_egress_plan_without_egress_mode() -> None:
    assert resolve_create("default", Policy(), CreateRequest(), cwd="/srv").egress is None


def test_the_sandboxes_with_egress_rules_are_read_from_nft_json() -> None:
    listing = (
        '{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, '
        '{"map": {"family": "inet", "name": "sandbox_egress", "table": "nspawn_mcp", '
        '"type": "ifname", "handle": 1, "map": "verdict", '
        '"elem": [["ve-sbx-0123abcd", {"jump": {"target": "egress_0123abcd"}}]]}}]}'
    )
    assert egress_interfaces_in(listing) == {"sbx-0123abcd"}
    assert egress_interfaces_in('{"nftables": [{"metainfo": {}}]}') == set()


def client_hello(server_name: str | None) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    outgoing = ssl.MemoryBIO()
    connection = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def test_the_server_name_is_read_from_a_client_hello() -> None:
    hello = client_hello("Files.PythonHosted.org")
    assert parse_sni(hello) == (True, "files.pythonhosted.org")
    assert parse_sni(hello[:40]) == (False, None)
    assert parse_sni(client_hello(None)) == (True, None)
    assert parse_sni(b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n") == (True, None)
    assert parse_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == (True, None)
