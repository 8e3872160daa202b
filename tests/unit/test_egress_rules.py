"""The pure rules of egress sandboxes: addresses, names, answers, and the nftables text."""

from __future__ import annotations

import ssl
from dataclasses import replace

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from inline_snapshot import snapshot

from nspawn_mcp.backend.egress import (
    MAX_TLS_RECORD,
    DnsQuestion,
    NotTls,
    TlsFraming,
    UpstreamReply,
    base_ruleset,
    dns_action,
    domain_allowed,
    egress_interfaces_in,
    endpoints,
    frame_tls,
    parse_sni,
    reachable_answer,
    read_question,
    read_upstream_reply,
    resolved_addresses,
    sandbox_reply,
    sandbox_rules,
    sandbox_rules_removal,
    upstream_query,
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


def test_a_subnets_ends_are_the_gateway_and_the_sandbox() -> None:
    assert endpoints("10.213.0.4/30") == ("10.213.0.5", "10.213.0.6")


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
add map inet nspawn_mcp sandbox_input { type ifname : verdict; }
add map inet nspawn_mcp sandbox_egress { type ifname : verdict; }
add map inet nspawn_mcp sandbox_sni { type ifname : verdict; }
add chain inet nspawn_mcp prerouting { type nat hook prerouting priority dstnat; policy accept; }
add chain inet nspawn_mcp input { type filter hook input priority filter; policy accept; }
add chain inet nspawn_mcp forward { type filter hook forward priority filter; policy accept; }
add chain inet nspawn_mcp postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule inet nspawn_mcp input iifname "ve-sbx-*" meta nfproto ipv4 iifname vmap @sandbox_input
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
add chain inet nspawn_mcp input_0123abcd
add rule inet nspawn_mcp input_0123abcd ip saddr 10.213.0.6 ip daddr 10.213.0.5 udp dport 53 accept
add rule inet nspawn_mcp input_0123abcd ip saddr 10.213.0.6 ip daddr 10.213.0.5 tcp dport 3129 accept
add chain inet nspawn_mcp egress_0123abcd
add chain inet nspawn_mcp sni_0123abcd
add rule inet nspawn_mcp egress_0123abcd ip daddr 203.0.113.0/24 tcp dport { 80, 443 } accept
add rule inet nspawn_mcp sni_0123abcd ip daddr 203.0.113.0/24 tcp dport { 80, 443 } return
add rule inet nspawn_mcp sni_0123abcd ip daddr @resolved_0123abcd tcp dport { 443 } dnat ip to 10.213.0.5:3129
add element inet nspawn_mcp sandbox_input { "ve-sbx-0123abcd" : jump input_0123abcd }
add element inet nspawn_mcp sandbox_egress { "ve-sbx-0123abcd" : jump egress_0123abcd }
add element inet nspawn_mcp sandbox_sni { "ve-sbx-0123abcd" : jump sni_0123abcd }
""")
    assert sandbox_rules_removal("sbx-0123abcd") == snapshot(
        [
            'delete element inet nspawn_mcp sandbox_input { "ve-sbx-0123abcd" }\n',
            'delete element inet nspawn_mcp sandbox_egress { "ve-sbx-0123abcd" }\n',
            'delete element inet nspawn_mcp sandbox_sni { "ve-sbx-0123abcd" }\n',
            "delete chain inet nspawn_mcp input_0123abcd\n",
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


def test_each_sandbox_reaches_only_its_own_services() -> None:
    """Input from a sandbox veth is dropped unless that veth's own chain accepts it, and the
    chain accepts only the sandbox's own address talking to its own gateway."""
    base = base_ruleset()
    assert "10.213.0.0/16 udp dport" not in base
    assert "10.213.0.0/16 tcp dport" not in base
    input_rules = [line for line in base.splitlines() if " input " in line and "add rule" in line]
    assert input_rules == [
        'add rule inet nspawn_mcp input iifname "ve-sbx-*" meta nfproto ipv4 iifname vmap @sandbox_input',
        'add rule inet nspawn_mcp input iifname "ve-sbx-*" drop',
    ]
    own = [line for line in sandbox_rules("sbx-0123abcd", PLAN).splitlines() if "input_0123abcd" in line]
    assert all("ip saddr 10.213.0.6 ip daddr 10.213.0.5 " in line for line in own if "add rule" in line)


# TLS framing: the sandbox's side of a relayed connection must stay TLS records.


def record(content_type: int, body: bytes, version: bytes = b"\x03\x03") -> bytes:
    return bytes([content_type]) + version + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("stream", "framed"),
    [
        (record(22, b"\x01hello"), True),  # handshake
        (record(23, b"secret" * 100) + record(21, b"\x01\x00"), True),  # application data, alert
        (record(20, b"\x01"), True),  # change_cipher_spec
        (record(23, b""), True),  # an empty record frames
        (record(23, b"x" * MAX_TLS_RECORD), True),  # the longest record allowed
        (record(22, b"\x01", version=b"\x03\x01"), True),  # legacy version 0x0301
        (record(22, b"\x01") + b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n", False),  # plaintext after
        (b"GET / HTTP/1.1\r\n", False),
        (record(24, b"heartbeat"), False),  # content type 24 (heartbeat) is not passed
        (record(19, b"x"), False),
        (record(23, b"x", version=b"\x02\x00"), False),  # SSL 2-ish version
        (b"\x17\x03\x03" + (MAX_TLS_RECORD + 1).to_bytes(2, "big"), False),  # too long
        (b"\x17\x03\x03\xff\xff", False),
        (b"\x17", True),  # a header so far: more needed, nothing wrong yet
        (b"\x17\x04", False),  # ... but each header byte is checked as it arrives
    ],
)
def test_only_tls_records_frame(stream: bytes, framed: bool) -> None:
    for chunk_size in (1, 3, 7, len(stream) or 1):  # however the stream is split
        state = TlsFraming()
        try:
            for start in range(0, len(stream), chunk_size):
                state = frame_tls(state, stream[start : start + chunk_size])
        except NotTls:
            assert not framed, (stream[:20], chunk_size)
        else:
            assert framed, (stream[:20], chunk_size)


def test_framing_carries_over_between_chunks() -> None:
    stream = record(23, b"a" * 10) + record(23, b"b" * 3)
    state = frame_tls(TlsFraming(), stream[:8])
    assert state == TlsFraming(b"", 7)  # 7 body bytes of the first record to come
    state = frame_tls(state, stream[8:17])
    assert state == TlsFraming(b"\x17\x03", 0)  # inside the second header
    assert frame_tls(state, stream[17:]) == TlsFraming()
    with pytest.raises(NotTls, match="content type 71"):
        frame_tls(TlsFraming(), b"GET")


def test_a_real_client_hello_frames_and_plaintext_after_it_does_not() -> None:
    hello = client_hello("allowed.test")
    assert frame_tls(TlsFraming(), hello) == TlsFraming()
    with pytest.raises(NotTls):
        frame_tls(TlsFraming(), hello + b"plain text, not a record")


# DNS: the server reads one question, asks its own query, checks the reply, builds the answer.


def sandbox_query(name: str = "Allowed.Test.", rdtype: str = "A", **options: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **options)  # type: ignore[arg-type]
    query.id = 0xBEEF
    return query


def test_a_sandbox_query_is_read_down_to_its_question() -> None:
    query = sandbox_query(
        use_edns=0, options=[dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"exfiltrated")]
    )
    query.additional.append(dns.rrset.from_text("x.evil.", 300, "IN", "TXT", '"more data"'))
    question = read_question(query.to_wire())
    assert question == DnsQuestion(0xBEEF, dns.name.from_text("Allowed.Test."), dns.rdatatype.A, True)
    assert question.name == "allowed.test"


def _not_a_query() -> list[bytes]:
    response = sandbox_query()
    response.flags |= dns.flags.QR
    two = sandbox_query()
    two.question.append(dns.rrset.RRset(dns.name.from_text("b.test."), dns.rdataclass.IN, dns.rdatatype.A))
    chaos = dns.message.make_query("allowed.test.", "TXT", rdclass="CH")
    update = sandbox_query()
    update.set_opcode(dns.opcode.UPDATE)
    return [
        response.to_wire(),
        two.to_wire(),
        chaos.to_wire(),
        update.to_wire(),
        b"",
        b"\x00" * 11,
        b"junk" * 30,
    ]


@pytest.mark.parametrize("packet", _not_a_query())
def test_anything_but_one_class_in_question_is_dropped(packet: bytes) -> None:
    assert read_question(packet) is None


@pytest.mark.parametrize(
    ("name", "rdtype", "action"),
    [
        ("allowed.test.", "A", "ask"),
        ("ALLOWED.test.", "A", "ask"),
        ("allowed.test.", "AAAA", "empty"),
        ("allowed.test.", "TXT", "empty"),
        ("secret.allowed.test.", "A", "refuse"),
        ("evil.test.", "A", "refuse"),
        ("evil.test.", "AAAA", "refuse"),
    ],
)
def test_the_resolver_asks_only_for_listed_names(name: str, rdtype: str, action: str) -> None:
    question = read_question(sandbox_query(name, rdtype).to_wire())
    assert question is not None
    assert dns_action(question, ("allowed.test",)) == action


def test_upstream_gets_a_fresh_minimal_query() -> None:
    wire = upstream_query("Allowed.Test.", 0x1234)
    assert wire.hex() == snapshot("12340100000100000000000007616c6c6f77656404746573740000010001")
    query = dns.message.from_wire(wire)
    assert query.id == 0x1234
    assert query.edns == -1
    assert query.flags == dns.flags.RD
    assert query.question == [
        dns.rrset.RRset(dns.name.from_text("allowed.test."), dns.rdataclass.IN, dns.rdatatype.A)
    ]
    assert query.answer == query.authority == query.additional == []


def upstream_answer(
    query_id: int = 0x1234, name: str = "allowed.test.", *records: str
) -> dns.message.Message:
    reply = dns.message.make_response(dns.message.make_query(name, "A", use_edns=False))
    reply.id = query_id
    for text in records:
        owner, rdtype, value = text.split(" ", 2)
        reply.answer.append(dns.rrset.from_text(owner, 30, "IN", rdtype, value))
    return reply


def test_the_upstream_reply_must_match_the_query() -> None:
    good = upstream_answer(0x1234, "allowed.test.", "allowed.test. A 198.18.0.2")
    assert read_upstream_reply(good.to_wire(), 0x1234, "allowed.test") == UpstreamReply(
        dns.rcode.NOERROR, (("198.18.0.2", 30),)
    )
    assert read_upstream_reply(good.to_wire(), 0x1235, "allowed.test") is None  # another ID
    assert read_upstream_reply(good.to_wire(), 0x1234, "other.test") is None  # another question
    not_a_reply = upstream_answer()
    not_a_reply.flags &= ~dns.flags.QR
    assert read_upstream_reply(not_a_reply.to_wire(), 0x1234, "allowed.test") is None
    aaaa = dns.message.make_response(dns.message.make_query("allowed.test.", "AAAA"))
    aaaa.id = 0x1234
    assert read_upstream_reply(aaaa.to_wire(), 0x1234, "allowed.test") is None
    assert read_upstream_reply(b"garbage", 0x1234, "allowed.test") is None


def test_only_the_asked_names_addresses_are_taken_from_upstream() -> None:
    reply = upstream_answer(
        0x1234,
        "allowed.test.",
        "allowed.test. CNAME cdn.example.",
        "cdn.example. A 198.18.0.2",
        "unrelated.example. A 198.18.0.3",  # not on the chain: ignored
        'allowed.test. TXT "ignored"',
    )
    assert read_upstream_reply(reply.to_wire(), 0x1234, "allowed.test") == UpstreamReply(
        dns.rcode.NOERROR, (("198.18.0.2", 30),)
    )
    loop = upstream_answer(0x1234, "allowed.test.", "allowed.test. CNAME allowed.test.")
    assert read_upstream_reply(loop.to_wire(), 0x1234, "allowed.test") == UpstreamReply(0, ())
    failed = upstream_answer()
    failed.set_rcode(dns.rcode.REFUSED)
    assert read_upstream_reply(failed.to_wire(), 0x1234, "allowed.test") == UpstreamReply(
        dns.rcode.SERVFAIL, ()
    )


def test_the_sandbox_gets_an_answer_the_server_built() -> None:
    question = read_question(sandbox_query(use_edns=0).to_wire())
    assert question is not None
    reply = dns.message.from_wire(sandbox_reply(question, dns.rcode.NOERROR, {"198.18.0.2": 30}))
    assert reply.id == 0xBEEF
    assert reply.edns == -1
    assert reply.flags == dns.flags.QR | dns.flags.RA | dns.flags.RD
    assert [rrset.to_text() for rrset in reply.answer] == ["Allowed.Test. 30 IN A 198.18.0.2"]
    assert reply.authority == reply.additional == []
    refused = dns.message.from_wire(sandbox_reply(question, dns.rcode.REFUSED, {}))
    assert refused.rcode() == dns.rcode.REFUSED
    assert refused.answer == []
