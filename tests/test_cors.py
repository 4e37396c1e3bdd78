"""CORS for browser clients (`--cors-origins`): preflights answered without a key, the allow-origin
header on every answer to an allowed origin (errors and streams included), nothing for others."""

from __future__ import annotations

import httpx
import pytest

from proxy.cors import Cors

ORIGIN = "https://chat.example"
KEY = "sk-browser-123456"
BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}
PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type, x-stainless-os"}


@pytest.fixture
def base(completions_route, keys_for, proxy_for) -> str:
    return proxy_for(completions_route, keys=keys_for(web=KEY), cors=Cors.parse(f"{ORIGIN}, https://other.example"))


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(base, upstream):
    r = httpx.options(f"{base}/v1/completions", headers=PREFLIGHT)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"]
    for h in ("authorization", "x-api-key", "anthropic-version", "content-type", "x-stainless-os"):
        assert h in allowed
    names = [n.strip() for n in allowed.split(",")]
    assert len(names) == len(set(names)), f"a header named twice: {allowed}"
    assert upstream.requests == []


def test_answers_errors_and_streams_carry_the_allowed_origin(base):
    auth = {"origin": ORIGIN, "authorization": f"Bearer {KEY}"}
    ok = httpx.post(f"{base}/v1/completions", json=BODY, headers=auth)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in ok.headers["access-control-expose-headers"]
    denied = httpx.post(f"{base}/v1/completions", json=BODY, headers={"origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    with httpx.stream("POST", f"{base}/v1/completions", json={**BODY, "stream": True}, headers=auth) as s:
        assert s.headers["access-control-allow-origin"] == ORIGIN
        assert "data: [DONE]" in s.read().decode()
    assert httpx.get(f"{base}/healthz", headers={"origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN


def test_other_origins_get_nothing_and_their_preflight_is_an_ordinary_request(base, upstream):
    stranger = {**PREFLIGHT, "origin": "https://evil.example"}
    r = httpx.options(f"{base}/v1/completions", headers=stranger)
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
    r = httpx.post(f"{base}/v1/completions", json=BODY, headers={"origin": "https://evil.example", "x-api-key": KEY})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # OPTIONS from an allowed origin but not a preflight: refused like any request without a key
    r = httpx.options(f"{base}/v1/completions", headers={"origin": ORIGIN})
    assert r.status_code == 401
    r = httpx.options(f"{base}/v1/completions", headers={"origin": ORIGIN, "x-api-key": KEY})
    assert r.status_code == 405  # the route takes POST only
    assert len(upstream.requests) == 1


def test_a_star_allows_any_origin_and_cors_is_off_by_default(completions_route, proxy_for):
    folder = completions_route
    star = proxy_for(folder, cors=Cors.parse("*"))
    r = httpx.options(f"{star}/v1/completions", headers={**PREFLIGHT, "origin": "https://any.example"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    off = proxy_for(folder)
    r = httpx.options(f"{off}/v1/completions", headers=PREFLIGHT)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    assert Cors.parse("") is None and Cors.parse(None) is None
