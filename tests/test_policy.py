"""The pure parts of brokered calls: how a URL is read, which destinations a policy allows, which
addresses are refused, and which spellings of a value are redacted."""

from __future__ import annotations

import base64

import pytest

from proxy import broker, redact
from proxy.policy import PolicyError, build_policy, parse_injection, parse_url

POLICY = build_policy(
    ["https://api.example.com/v1/", "https://files.example.com:8443/"], [], "Authorization: Bearer {value}"
)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1/items",
        "https://API.Example.com/v1/items?x=1",
        "https://api.example.com:443/v1/",
        "https://api.example.com./v1/x",
        "https://files.example.com:8443/anything",
    ],
)
def test_listed_destinations_are_allowed(url):
    assert POLICY is not None and POLICY.destination_for(parse_url(url)) is not None


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1",
        "https://api.example.com/v1beta/x",
        "https://api.example.com/v2/x",
        "http://api.example.com/v1/x",
        "https://api.example.com:8443/v1/x",
        "https://files.example.com/x",
        "https://evil.example.com/v1/x",
        "https://api.example.com.evil.net/v1/x",
    ],
)
def test_other_destinations_are_not(url):
    assert POLICY is not None and POLICY.destination_for(parse_url(url)) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1/../admin",
        "https://api.example.com/v1/%2e%2e/admin",
        "https://api.example.com/v1/x%2Fy",
        "https://api.example.com/v1//x",
        "https://user:pw@api.example.com/v1/",
        "https://api.example.com@evil.net/v1/",
        "https://api.example.com/v1/#frag",
        "ftp://api.example.com/v1/",
        "https://api.example.com/v1/ x",
        "https://api.example.com:0/v1/",
        "https:///v1/",
        "https://api.example.com/v1/a\\b",
    ],
)
def test_ambiguous_urls_are_refused(url):
    with pytest.raises(PolicyError):
        parse_url(url)


@pytest.mark.parametrize(
    "spec,kind", [("X-Api-Key: {value}", "header"), ("query:api_key", "query"), ("basic:bot", "basic")]
)
def test_injections_parse(spec, kind):
    assert parse_injection(spec).kind == kind


@pytest.mark.parametrize(
    "spec",
    [
        "Authorization: Bearer",
        "Authorization: {value}{value}",
        "Bad Name: {value}",
        "query:",
        "basic:a:b",
        "X: {value}\r\nY: 1",
    ],
)
def test_bad_injections_are_refused(spec):
    with pytest.raises(PolicyError):
        parse_injection(spec)


def test_a_policy_needs_both_destination_and_injection():
    assert build_policy([], [], None) is None
    with pytest.raises(PolicyError):
        build_policy(["https://a.example/"], [], None)
    with pytest.raises(PolicyError):
        build_policy([], [], "X: {value}")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "100.64.0.1",
        "fec0::1",  # site-local: deprecated, still routed inside some networks
    ],
)
def test_private_loopback_link_local_and_metadata_addresses_are_blocked(address):
    assert broker.blocked(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_global_addresses_are_not(address):
    assert not broker.blocked(address)


def test_every_spelling_of_the_value_is_redacted():
    value = b"s3cr+t/val=ue?&"
    text = b" ".join(
        [
            value,
            base64.b64encode(value),
            base64.urlsafe_b64encode(value).rstrip(b"="),
            b"s3cr%2Bt%2Fval%3Due%3F%26",
            b"s3cr%2bt%2fval%3due%3f%26",
            b"s3cr%2Bt%2Fval%3Due%3F%26",
        ]
    )
    out, count = redact.redact(text, redact.forms(value))
    assert count == 6 and out == b" ".join([redact.MARK] * 6)


def test_a_name_resolving_to_any_blocked_address_is_refused_even_with_a_good_one():
    destination = POLICY.destinations[0]  # type: ignore[union-attr]
    target = parse_url("https://api.example.com/v1/x")
    with pytest.raises(broker.BrokerError) as refused:
        broker.pick_addresses(target, destination, ["93.184.216.34", "10.0.0.5"])
    assert refused.value.code == "address_not_allowed"
    assert broker.pick_addresses(target, destination, ["93.184.216.34"]) == ["93.184.216.34"]
