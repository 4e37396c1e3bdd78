"""The header policy, as a table: what reaches the upstream and what comes back."""

import pytest

from proxy.headers import normalize, request_id, to_client, to_upstream

SECRET = "Bearer route-secret"
DEFAULTS = normalize({"Authorization": SECRET, "X-Team": "llm"})


def names(headers):
    return [n for n, _ in headers]


def value(headers, name):
    found = [v for n, v in headers if n == name]
    assert len(found) <= 1, f"{name!r} appears {len(found)} times"
    return found[0].decode() if found else None


@pytest.mark.parametrize("client_name", [b"authorization"])
@pytest.mark.parametrize("default_name", ["Authorization", "AUTHORIZATION", "authorization", "aUtHoRiZaTiOn"])
def test_defaults_win_case_insensitively(client_name, default_name):
    out = to_upstream([(client_name, b"Bearer client")], normalize({default_name: SECRET}), rid=b"r1")
    assert value(out, b"authorization") == SECRET


@pytest.mark.parametrize(
    "hop",
    [b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate", b"proxy-connection",
     b"te", b"trailer", b"transfer-encoding", b"upgrade"],
)
def test_hop_by_hop_never_reach_upstream(hop):
    out = to_upstream([(hop, b"x"), (b"accept", b"*/*")], [], rid=b"r1")
    assert hop not in names(out)
    assert value(out, b"accept") == "*/*"


def test_names_listed_in_connection_are_hop_by_hop_too():
    client = [(b"connection", b"keep-alive, X-Private , x-other"), (b"x-private", b"1"), (b"x-other", b"2"), (b"x-keep", b"3")]
    out = to_upstream(client, [], rid=b"r1")
    assert names(out).count(b"x-keep") == 1
    assert b"x-private" not in names(out) and b"x-other" not in names(out)


def test_host_and_content_length_are_the_upstreams_business():
    out = to_upstream([(b"host", b"proxy:8080"), (b"content-length", b"999"), (b"expect", b"100-continue")], [], rid=b"r1")
    assert not {b"host", b"content-length", b"expect"} & set(names(out))


def test_request_id_is_kept_when_sane_and_created_otherwise():
    assert request_id([(b"x-request-id", b"abc-123")]) == b"abc-123"
    made = request_id([(b"x-request-id", b"bad id\twith spaces")])
    assert made != b"bad id\twith spaces" and len(made) == 32
    assert request_id([]) != request_id([])  # fresh each time
    out = to_upstream([(b"x-request-id", b"abc-123")], [], rid=b"abc-123")
    assert value(out, b"x-request-id") == "abc-123"


def test_forwarded_headers_are_added_and_chained():
    out = to_upstream([(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-proto", b"gopher")], [], rid=b"r", client_ip="127.0.0.5", scheme="https")
    assert value(out, b"x-forwarded-for") == "10.0.0.1, 127.0.0.5"
    assert value(out, b"x-forwarded-proto") == "https"


def test_defaults_win_over_the_proxys_own_headers_too():
    out = to_upstream([], normalize({"X-Forwarded-Proto": "https"}), rid=b"r", scheme="http")
    assert value(out, b"x-forwarded-proto") == "https"


def test_adapter_may_drop_client_headers():
    out = to_upstream([(b"accept-encoding", b"gzip")], [], rid=b"r", drop=frozenset({b"accept-encoding"}))
    assert b"accept-encoding" not in names(out)


def test_response_headers_lose_hop_by_hop_and_gain_request_id():
    upstream = [(b"Content-Type", b"application/json"), (b"Transfer-Encoding", b"chunked"), (b"Connection", b"close, X-Up"),
                (b"X-Up", b"1"), (b"Keep-Alive", b"timeout=5"), (b"X-Request-ID", b"upstream-id"), (b"Server", b"vllm")]
    out = to_client(upstream, rid=b"r-9")
    assert value(out, b"content-type") == "application/json"
    assert value(out, b"server") == "vllm"
    assert value(out, b"x-request-id") == "r-9"
    assert not {b"transfer-encoding", b"connection", b"keep-alive", b"x-up"} & set(names(out))


def test_response_headers_drop_what_a_rewritten_body_makes_false():
    out = to_client([(b"content-length", b"12"), (b"content-type", b"x")], rid=b"r", drop=frozenset({b"content-length"}))
    assert names(out) == [b"content-type", b"x-request-id"]


def test_default_header_values_never_come_back():
    out = to_client([(b"content-type", b"application/json")], rid=b"r")
    assert SECRET.encode() not in b"".join(v for _, v in out)
    assert all(n in names(to_upstream([], DEFAULTS, rid=b"r")) for n, _ in DEFAULTS)
