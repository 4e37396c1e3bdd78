"""Inbound API keys (`serve --keys FILE`): nobody reaches an upstream without one, and the key
never travels further than the gate: not upstream, not into logs, not into metrics."""

from __future__ import annotations

import json
import logging
import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from proxy import cli
from proxy.adapters.registry import ADAPTERS
from proxy.app import create_app
from proxy.config import load_keys
from proxy.errors import ConfigError
from proxy.keys import KeysHolder
from proxy.routes import RouteTable
from servers import run_app

ALICE = "sk-alice-0123456789abcdef"
CI = "sk-ci-fedcba9876543210"
UPSTREAM_SECRET = "upstream-credential-42"


def write_keys(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALICE_KEY", ALICE)
    monkeypatch.setenv("CI_KEY", CI)
    return write_keys(tmp_path / "keys.yaml", """\
        keys:
          - name: alice
            key: ${ALICE_KEY}
            routes: ["qwen-*"]
          - name: ci
            key: ${CI_KEY}
    """)


@pytest.fixture
def two_routes(routes_dir, upstream):
    return routes_dir(
        completions=f"""
            name: qwen-completions
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
            default_headers:
              Authorization: Bearer {UPSTREAM_SECRET}
        """,
        other=f"""
            name: other
            path: /v1/other
            models: [other-model]
            upstream: {upstream.url}/v1/completions
        """,
    )


@pytest.fixture
def gated(two_routes, keys_file, proxy_for):
    return proxy_for(two_routes, keys=KeysHolder.load(keys_file))


BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}


def test_no_request_reaches_an_upstream_without_a_valid_key(gated, upstream):
    url = f"{gated}/v1/completions"
    refused = [
        {},  # no key
        {"authorization": "Bearer sk-wrong"},
        {"x-api-key": "sk-wrong"},
        {"authorization": f"Basic {ALICE}"},  # not a Bearer key
        {"authorization": "Bearer"},  # no key after the scheme
        {"authorization": "Bearer " + "A" * 10_000},  # over-long
        {"authorization": f"Bearer {ALICE}", "x-api-key": CI},  # two different keys: refused, not guessed
        {"authorization": f"Bearer {ALICE[:-1]}"},  # one character short
    ]
    for hdrs in refused:
        r = httpx.post(url, json=BODY, headers=hdrs)
        assert r.status_code == 401, hdrs
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert ALICE not in r.text and CI not in r.text
    assert httpx.post(f"{url}?api_key={ALICE}", json=BODY).status_code == 401  # a key in the query is no key
    assert upstream.requests == []
    assert httpx.post(url, json=BODY, headers={"authorization": f"Bearer {ALICE}"}).status_code == 200
    assert httpx.post(url, json=BODY, headers={"x-api-key": CI}).status_code == 200  # Anthropic clients' header
    assert len(upstream.requests) == 2


def test_the_official_openai_client_gets_an_authentication_error_and_then_works(gated):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=f"{gated}/v1", api_key="sk-nope", max_retries=0).completions.create(model="m", prompt="x")
    assert info.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{gated}/v1", api_key=ALICE, max_retries=0)
    assert client.completions.create(model="m", prompt="x").choices[0].text
    assert [m.id for m in client.models.list()] == ["qwen-completions"]  # alice may not use `other`


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_inbound_key_never_reaches_the_upstream_the_logs_or_the_metrics(gated, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    before = {k: sample("llmproxy_key_requests_total", key=k, status="200") for k in ("alice", "ci")}
    failures = sample("llmproxy_auth_failures_total", status="401")
    for hdrs in ({"authorization": f"Bearer {ALICE}"}, {"x-api-key": ALICE}, {"x-api-key": CI}):
        assert httpx.post(f"{gated}/v1/completions", json=BODY, headers=hdrs).status_code == 200
    assert httpx.post(f"{gated}/v1/other", json={**BODY, "model": "other-model"},
                      headers={"x-api-key": CI}).status_code == 200  # a route without default_headers
    httpx.post(f"{gated}/v1/completions", json=BODY, headers={"authorization": f"Bearer {ALICE}x"})  # a wrong one
    seen = upstream.requests
    assert len(seen) == 4
    for req in seen[:3]:
        assert req.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"  # the route's own credential
        assert "x-api-key" not in req.headers
    assert "authorization" not in seen[3].headers and "x-api-key" not in seen[3].headers
    metrics = httpx.get(f"{gated}/metrics").text
    logs = "\n".join(logging.Formatter().format(r) + repr(r.msg) for r in caplog.records)
    for text in (metrics, logs, json.dumps([r.headers for r in seen])):
        assert ALICE not in text and CI not in text
    assert 'llmproxy_key_requests_total{key="alice",status="200"}' in metrics
    assert sample("llmproxy_key_requests_total", key="alice", status="200") == before["alice"] + 2
    assert sample("llmproxy_key_requests_total", key="ci", status="200") == before["ci"] + 2
    assert sample("llmproxy_auth_failures_total", status="401") == failures + 1
    access = [r.msg for r in caplog.records if r.name == "llmproxy.access"]
    assert [a.key for a in access] == ["alice", "alice", "ci", "ci", None]


def test_a_key_may_only_use_its_routes_and_sees_only_their_models(gated, upstream):
    r = httpx.post(f"{gated}/v1/other", json={**BODY, "model": "other-model"}, headers={"x-api-key": ALICE})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "permission_denied"
    assert "key 'alice' may not use route 'other'" in r.json()["error"]["message"]
    assert upstream.requests == []
    ids = lambda key: [m["id"] for m in httpx.get(f"{gated}/v1/models", headers={"x-api-key": key}).json()["data"]]  # noqa: E731
    assert ids(ALICE) == ["qwen-completions"]
    assert ids(CI) == ["qwen-completions", "other-model"]
    # One model: only among the routes the key may use (`other-model` is not alice's).
    one = lambda key, name: httpx.get(f"{gated}/v1/models/{name}", headers={"x-api-key": key})  # noqa: E731
    assert one(CI, "other-model").json()["owned_by"] == "other"
    assert one(ALICE, "other-model").json()["owned_by"] == "qwen-completions"  # her fallback route answers it
    assert one("wrong", "other-model").status_code == 401


def test_probes_and_scrapes_stay_open_everything_else_needs_a_key(gated):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{gated}{path}").status_code == 200, path
    for path in ("/v1/models", "/v1/models/", "//v1/models", "/v1%2Fmodels", "/nope", "/v1/chat/completions", "//healthz"):
        assert httpx.get(f"{gated}{path}").status_code == 401, path
    assert httpx.get(f"{gated}/nope", headers={"x-api-key": CI}).status_code == 404  # routing only after the key


def test_a_changed_keys_file_is_picked_up_and_a_broken_one_keeps_the_previous_keys(two_routes, keys_file, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy")
    app = create_app(RouteTable.from_dir(two_routes), keys=KeysHolder.load(keys_file), poll_interval=0.05)
    with run_app(app) as base:
        url = f"{base}/v1/completions"

        def status(key: str) -> int:
            return httpx.post(url, json=BODY, headers={"x-api-key": key}).status_code

        def eventually(key: str, code: int) -> None:
            deadline = time.monotonic() + 5
            while status(key) != code:
                assert time.monotonic() < deadline, f"{key} never answered {code}"
                time.sleep(0.05)

        assert status(ALICE) == 200
        write_keys(keys_file, """\
            keys:
              - name: alice
                key: sk-alice-rotated-000000
        """)
        eventually(ALICE, 401)  # revoked without a restart
        assert status("sk-alice-rotated-000000") == 200
        write_keys(keys_file, """\
            keys:
              - name: alice
                key: sk-a-1111111111111
              - name: alice
                key: sk-a-2222222222222
        """)
        # Read and refused before the checks (a fixed 0.5 s sleep could end before the poll had looked).
        deadline = time.monotonic() + 5
        while not any("'alice' is already used" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the broken keys file was never reported"
            time.sleep(0.05)
        assert status("sk-alice-rotated-000000") == 200  # the previous keys stay
        assert status("sk-a-1111111111111") == 401
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("keys not reloaded, the previous keys stay in service" in m and "keys[1].name: 'alice' is already used" in m
               for m in errors_logged), errors_logged


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keys:\n  - name: a\n    key: sk-k1-0000000000000\n  - name: a\n    key: sk-k2-0000000000000\n", ":4: keys[1].name: 'a' is already used by keys[0]"),
        ("keys:\n  - name: a\n    key: sk-k1-0000000000000\n  - name: b\n    key: sk-k1-0000000000000\n", ":5: keys[1].key: the same key as keys[0] ('a')"),
        ("keys:\n  - name: a\n    key: ${NO_SUCH_KEY_VAR:-}\n", ":3: keys[0].key: must not be empty"),
        ("keys:\n  - name: a\n    key: ${NO_SUCH_KEY_VAR}\n", ":3: keys[0].key: environment variable NO_SUCH_KEY_VAR is not set"),
        ("keys:\n  - name: a\n    key: 'sk-k1 000000000000'\n", ":3: keys[0].key: must not contain white space"),
        ("keys:\n  - name: a\n    key: sk-k1-0000000000000\n    rutes: ['*']\n", ":4: keys[0].rutes: unknown field"),
        ("keys:\n  - name: a\n    key: sk-k1-0000000000000\n    max_concurrent: 0\n", ":4: keys[0].max_concurrent: must be at least 1"),
        ("keys:\n  - name: a\n", ":2: keys[0].key: required field is missing"),
        ("keys: [\n", ":2: yaml: expected the node content"),
        ("keys:\n  - name: a\n    key: short-key\n", ":3: keys[0].key: key 'a' is shorter than 16 characters"),
    ],
)
def test_check_keys_reports_file_line_field_and_reason(tmp_path, text, expected):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    assert str(info.value).startswith(f"{path}{expected}"), str(info.value)
    assert "sk-k1" not in str(info.value) and "short-key" not in str(info.value)  # a key is never quoted


def test_llmproxy_check_keys_validates_and_lists_names_never_keys(two_routes, keys_file, capsys):
    assert cli.main(["check", "--routes", str(two_routes), "--keys", str(keys_file)]) == 0
    out = capsys.readouterr().out
    assert "key alice: qwen-*" in out and "key ci: all routes" in out and "2 key(s) OK" in out
    assert ALICE not in out and CI not in out
    keys_file.write_text("keys:\n  - name: x\n    key: ''\n")
    for command in ("check", "serve"):  # serve refuses to start on it, as on a bad route file
        assert cli.main([command, "--routes", str(two_routes), "--keys", str(keys_file)]) == cli.EXIT_CONFIG
        assert f"{keys_file}:3: keys[0].key: must not be empty" in capsys.readouterr().err


def test_errors_on_an_anthropic_route_take_anthropics_shape(two_routes, keys_file, proxy_for, monkeypatch):
    # The shape is keyed on the adapter name through the adapter table's `face`, so pretend
    # passthrough is an Anthropic face for this test.
    monkeypatch.setitem(ADAPTERS, "passthrough", ADAPTERS["passthrough"]._replace(face="anthropic"))
    base = proxy_for(two_routes, keys=KeysHolder.load(keys_file))
    r = httpx.post(f"{base}/v1/completions", json=BODY, headers={"x-api-key": "sk-wrong", "anthropic-version": "2023-06-01"})
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    r = httpx.post(f"{base}/v1/other", json={**BODY, "model": "other-model"}, headers={"x-api-key": ALICE})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{base}/v1/models").json()["error"]["code"] == "invalid_api_key"  # OpenAI's endpoint


def test_serving_beyond_loopback_without_keys_is_warned_about():
    assert cli.is_loopback("127.0.0.1") and cli.is_loopback("::1") and cli.is_loopback("localhost")
    assert not cli.is_loopback("0.0.0.0") and not cli.is_loopback("10.1.2.3") and not cli.is_loopback("proxy.example")


def test_the_official_anthropic_client_reads_the_refusals(two_routes, keys_file, proxy_for, monkeypatch):
    """Anthropic's SDK sends `x-api-key` and raises by status, reading `error.message` from the
    Anthropic shape (anthropic-sdk-python src/anthropic/_client.py `_make_status_error`)."""
    anthropic = pytest.importorskip("anthropic")  # in the dev extra once the messages face lands
    monkeypatch.setitem(ADAPTERS, "passthrough", ADAPTERS["passthrough"]._replace(face="anthropic"))
    base = proxy_for(two_routes, keys=KeysHolder.load(keys_file))

    def post(key: str, path: str) -> None:
        client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
        client.post(path, body={**BODY, "model": "other-model"}, cast_to=object)

    with pytest.raises(anthropic.AuthenticationError) as info:
        post("sk-wrong", "/v1/completions")
    assert info.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    assert "invalid API key" in str(info.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        post(ALICE, "/v1/other")
    post(CI, "/v1/other")  # the key goes as x-api-key and is accepted
