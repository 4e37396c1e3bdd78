"""Model routing, `upstream_model`, `/v1/models`, upstream lists: two real mock upstreams on loopback."""

from __future__ import annotations

import logging
import re

import httpx
import msgspec
import pytest

from proxy.cli import main as cli
from proxy.routes import UNREAD, RouteTable
from proxy.upstreams import Pool
from servers import free_port, run_mock

# Refused on loopback, and never handed out by bind(0) to a server of the test (below 1024): a port
# found free and released could be the proxy's own a moment later. (Port 9 is the suite's dead default.)
DEAD, DEAD2 = 9, 7


@pytest.fixture
def two():
    with run_mock() as a, run_mock() as b:
        yield a, b


def completions(base: str, model: str | None, **extra: object) -> httpx.Response:
    body: dict[str, object] = {"prompt": "hi", **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{base}/v1/completions", json=body, timeout=10)


def sse_data(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


def test_model_picks_route_by_name_and_glob_then_fallback(two, routes_dir, proxy_for):
    a, b = two
    base = proxy_for(routes_dir(
        alpha=f"""
            path: /v1/completions
            models: [alpha]
            upstream: {a.url}/v1/completions
        """,
        beta=f"""
            path: /v1/completions
            models: ["beta-*"]
            upstream: {b.url}/v1/completions
        """,
        zz_rest=f"""
            path: /v1/completions
            upstream: {a.url}/v1/completions
        """,
    ))
    assert completions(base, "alpha").status_code == 200
    assert len(a.requests) == 1 and not b.requests
    r = completions(base, "beta-7b")
    assert r.status_code == 200 and r.json()["model"] == "beta-7b"
    assert len(b.requests) == 1
    assert completions(base, "beta").status_code == 200  # the glob needs the dash: fallback
    assert completions(base, "gamma").status_code == 200
    assert completions(base, None).status_code == 200
    assert len(a.requests) == 4 and len(b.requests) == 1


def test_unknown_model_is_404_listing_what_the_path_serves(two, routes_dir, proxy_for):
    a, b = two
    base = proxy_for(routes_dir(
        alpha=f"""
            path: /v1/completions
            models: [alpha, "alpha-*"]
            upstream: {a.url}/v1/completions
        """,
        beta=f"""
            path: /v1/completions
            models: ["beta-*", alpha]
            upstream: {b.url}/v1/completions
        """,
    ))
    r = completions(base, "gamma")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'gamma'" in err["message"]
    assert err["message"].endswith("available: alpha, alpha-*, beta-*")
    r = completions(base, None)
    assert r.status_code == 404 and "names no model" in r.json()["error"]["message"]
    # A body that is not JSON is the client's mistake whatever the path: 400, not 404.
    r = httpx.post(f"{base}/v1/completions", content=b"not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert not a.requests and not b.requests


def test_first_file_wins_on_overlap_and_check_warns(two, routes_dir, proxy_for, capsys):
    a, b = two
    folder = routes_dir(
        a_wide=f"""
            path: /v1/completions
            models: ["qwen*"]
            upstream: {a.url}/v1/completions
        """,
        b_narrow=f"""
            path: /v1/completions
            models: ["qwen2.5-*", other]
            upstream: {b.url}/v1/completions
        """,
    )
    base = proxy_for(folder)
    assert completions(base, "qwen2.5-7b").status_code == 200
    assert len(a.requests) == 1 and not b.requests
    assert completions(base, "other").status_code == 200
    assert len(b.requests) == 1

    assert cli(["check", "--routes", str(folder)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "b_narrow.yaml: models: 'qwen2.5-*' overlaps 'qwen*' of route 'a_wide'" in warnings[0]
    assert out.rstrip().endswith("2 route(s) OK on 1 path(s), 1 warning(s)")


def test_check_lists_path_models_upstreams_adapter_and_stream(routes_dir, capsys):
    port = free_port()
    folder = routes_dir(m=f"""
        path: /v1/chat/completions
        models: [qwen, "qwen2.5-*"]
        upstream_model: Qwen2.5-7B
        stream: always
        upstream: [http://127.0.0.1:{port}/v1/x, http://127.0.0.1:{port + 1}/v1/x]
    """)
    assert cli(["check", "--routes", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row, extra = lines[0].split(), lines[1].split(), lines[2].split()
    assert header[:6] == ["PATH", "METHODS", "MODELS", "ADAPTER", "STREAM", "UPSTREAM"]
    assert row[:8] == ["/v1/chat/completions", "POST", "qwen,qwen2.5-*", "->", "Qwen2.5-7B", "passthrough", "always",
                       f"http://127.0.0.1:{port}/v1/x"]
    assert extra == [f"http://127.0.0.1:{port + 1}/v1/x"]


def test_check_probe_shows_each_upstream_up_or_down(upstream, routes_dir, capsys):
    dead = DEAD
    folder = routes_dir(m=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, http://127.0.0.1:{dead}/v1/completions]
        default_headers: {{Authorization: Bearer probe-key}}
    """)
    assert cli(["check", "--routes", str(folder), "--probe"]) == 4  # one upstream is down
    out = capsys.readouterr().out
    assert re.search(re.escape(f"{upstream.url}/v1/completions [up: GET /v1/models 200 in ") + r"\d+ ms\]", out), out
    assert f"http://127.0.0.1:{dead}/v1/completions [down: connection refused]" in out
    # A real HTTP request to the server's base, with the route's headers (a keyed vLLM wants them).
    (probe,) = upstream.requests
    assert (probe.method, probe.path) == ("GET", "/v1/models")
    assert probe.headers.get("authorization") == "Bearer probe-key"

    only_up = routes_dir(m=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
    """)
    assert cli(["check", "--routes", str(only_up), "--probe"]) == 0


def test_check_probe_reports_an_http_error_as_down(routes_dir, capsys):
    """A port that answers, but not as a model server (here: a 503 to every request)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Down(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        folder = routes_dir(m=f"""
            path: /v1/completions
            upstream: http://127.0.0.1:{server.server_port}/v1/
        """)
        assert cli(["check", "--routes", str(folder), "--probe"]) == 4
    finally:
        server.shutdown()
    assert f"[down: GET /v1/models 503 in " in capsys.readouterr().out


def test_upstream_model_is_sent_upstream_and_hidden_from_the_client(upstream, routes_dir, proxy_for):
    base = proxy_for(routes_dir(q=f"""
        path: /v1/completions
        models: [qwen]
        upstream_model: Qwen2.5-7B-Instruct
        upstream: {upstream.url}/v1/completions
    """))
    r = completions(base, "qwen", max_tokens=5)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "qwen"
    assert r.json()["choices"][0]["text"] == "Hello from the mock upstream."
    assert "Qwen2.5-7B-Instruct" not in r.text
    sent = msgspec.json.decode(upstream.requests[-1].body)
    assert sent == {"prompt": "hi", "model": "Qwen2.5-7B-Instruct", "max_tokens": 5}

    body = {"model": "qwen", "prompt": "hi", "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers={"x-mock-events": "3"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert b"Qwen2.5-7B-Instruct" not in raw
    data = sse_data(raw)
    assert data[-1] == b"[DONE]"
    events = [msgspec.json.decode(d) for d in data[:-1]]
    assert len(events) == 4 and all(e["model"] == "qwen" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello from the mock upstream."
    assert msgspec.json.decode(upstream.requests[-1].body)["model"] == "Qwen2.5-7B-Instruct"


def test_plain_passthrough_stays_byte_for_byte(upstream, routes_dir, proxy_for):
    base = proxy_for(routes_dir(
        q=f"""
            path: /v1/completions
            models: [qwen]
            upstream: {upstream.url}/v1/completions
        """,
    ))
    body = b'{"model":  "qwen" , "prompt":"hi"}'
    r = httpx.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert upstream.requests[-1].body == body.decode()
    assert "content-length" in r.headers  # relayed as it came, not re-encoded


def test_v1_models_lists_declared_models_once(upstream, routes_dir, proxy_for):
    base = proxy_for(routes_dir(
        a=f"""
            path: /v1/chat/completions
            models: [qwen, "qwen2.5-*"]
            upstream_model: Secret-Upstream-Name
            upstream: {upstream.url}/v1/completions
        """,
        b=f"""
            path: /v1/completions
            models: [qwen, llama]
            upstream: {upstream.url}/v1/completions
        """,
        c=f"""
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
        """,
    ))
    r = httpx.get(f"{base}/v1/models")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["object"] == "list"
    # Concrete names only: a glob (`qwen2.5-*`) is not an id a client could pick.
    assert [(m["id"], m["owned_by"], m["object"]) for m in doc["data"]] == [
        ("qwen", "a", "model"), ("llama", "b", "model"),
        ("c", "c", "model"),  # a fallback answers any name: listed under its route name
    ]
    assert all(isinstance(m["created"], int) for m in doc["data"])
    assert "Secret-Upstream-Name" not in r.text
    assert httpx.get(f"{base}/v1/models/").json() == doc
    assert not upstream.requests  # answered by the proxy, never proxied

    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["qwen", "llama", "c"]
    # One model: a listed name, a name a glob serves, any name when a fallback exists.
    assert client.models.retrieve("qwen").owned_by == "a"
    assert client.models.retrieve("qwen2.5-7b").owned_by == "a"
    assert client.models.retrieve("anything").owned_by == "c"
    assert client.models.retrieve("Qwen/Qwen2.5-7B").id == "Qwen/Qwen2.5-7B"  # ids carry slashes

    r = httpx.post(f"{base}/v1/models", json={})
    assert r.status_code == 405 and "error" in r.json()
    # The plain route must not shadow the catch-all for its neighbours (Litestar's trie does
    # not backtrack): both still get the proxy's own OpenAI-shaped answers.
    r = httpx.get(f"{base}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{base}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert not upstream.requests


def test_round_robin_spreads_across_upstreams(two, routes_dir, proxy_for):
    a, b = two
    base = proxy_for(routes_dir(m=f"""
        path: /v1/completions
        upstream: [{a.url}/v1/completions, {b.url}/v1/completions]
    """))
    for _ in range(6):
        assert completions(base, "m").status_code == 200
    assert len(a.requests) == 3 and len(b.requests) == 3


def test_connect_failure_moves_to_the_next_upstream(upstream, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy")
    dead = DEAD
    base = proxy_for(routes_dir(m=f"""
        path: /v1/completions
        upstream: [http://127.0.0.1:{dead}/v1/completions, {upstream.url}/v1/completions]
    """))
    for _ in range(4):
        r = completions(base, "m", stream=True)
        assert r.status_code == 200, r.text
        assert r.text.endswith("data: [DONE]\n\n")
    assert len(upstream.requests) == 4
    down = [rec.getMessage() for rec in caplog.records if "marked down" in rec.getMessage()]
    assert down == [f"upstream http://127.0.0.1:{dead}/v1/completions of route 'm' marked down for 10s: "
                    f"ConnectionRefusedError: Connect call failed ('127.0.0.1', {dead})"]


def test_every_upstream_down_is_502(routes_dir, proxy_for):
    p1, p2 = DEAD, DEAD2
    base = proxy_for(routes_dir(m=f"""
        path: /v1/completions
        upstream: [http://127.0.0.1:{p1}/v1/completions, http://127.0.0.1:{p2}/v1/completions]
    """))
    r = completions(base, "m")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"


def test_upstream_errors_after_connecting_are_not_retried(two, routes_dir, proxy_for):
    a, b = two
    base = proxy_for(routes_dir(m=f"""
        path: /v1/completions
        upstream: [{a.url}/v1/completions, {b.url}/v1/completions]
    """))
    r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "x"}, headers={"x-mock-status": "503"})
    assert r.status_code == 503
    assert len(a.requests) + len(b.requests) == 1  # the request reached one; a POST is not repeated


def test_pool_skips_down_upstreams_and_logs_recovery(caplog):
    caplog.set_level(logging.INFO, logger="llmproxy")
    pool = Pool("r", ["http://a", "http://b", "http://c"])
    a, b, c = pool.members
    assert [pool.pick() for _ in range(4)] == [a, b, c, a]
    pool.failed(b, "refused")
    pool.failed(b, "refused")  # a concurrent failure: one log line
    assert [pool.pick() for _ in range(4)] == [c, a, c, a]  # b's turns are shared evenly by a and c
    assert pool.next_after([a]) == c  # healthy first
    assert pool.next_after([c, a]) == b  # then the one sitting out, rather than nothing
    assert pool.next_after([a, b, c]) is None
    pool.succeeded(b)
    assert [pool.pick() for _ in range(3)] == [b, c, a]  # b has its turn again
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["upstream http://b of route 'r' marked down for 10s: refused",
                        "upstream http://b of route 'r' is back up"]


def test_model_is_read_only_when_a_path_has_a_choice(routes_dir):
    table = RouteTable.from_dir(routes_dir(
        one="""
            path: /one
            upstream: http://127.0.0.1:9/x
        """,
        two="""
            path: /two
            models: [m]
            upstream: http://127.0.0.1:9/x
        """,
    ))
    # A single route without models never looks at the body, so even garbage routes.
    route, model = table.match("POST", "/one", b"\xff not json")
    assert (route.name, model) == ("one", UNREAD)
    route, model = table.match("POST", "/two", b'{"messages": [{"content": "x"}], "model": "m"}')
    assert (route.name, model) == ("two", "m")  # handed on, so observation need not decode it again
    r, _ = table.match("POST", "/two", b'{"model": "m", "prompt": "' + b"x" * 100_000 + b'"}')
    assert r.name == "two"


def test_v1_models_id_is_404_for_a_name_no_route_serves(upstream, routes_dir, proxy_for):
    base = proxy_for(routes_dir(a=f"""
        path: /v1/completions
        models: ["llama-3*"]
        upstream: {upstream.url}/v1/completions
    """))
    assert httpx.get(f"{base}/v1/models").json()["data"] == []  # a glob alone names no model
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("llama-3-8b").id == "llama-3-8b"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("qwen")
    assert info.value.code == "model_not_found"


def test_v1_models_lists_what_a_glob_only_routes_upstream_serves(upstream, routes_dir, proxy_for):
    """A glob names no model; the upstream's own /v1/models does. Listed: its ids that match the
    glob and that this route would really serve (an earlier file may win one)."""
    dead = DEAD
    base = proxy_for(routes_dir(
        a=f"""
            path: /v1/chat/completions
            models: [qwen2.5-72b]
            upstream: {upstream.url}/v1/completions
        """,
        b=f"""
            path: /v1/chat/completions
            models: ["qwen2.5-*"]
            upstream: {upstream.url}/v1/completions
            default_headers: {{x-mock-models: "qwen2.5-7b, llama-3, qwen2.5-72b"}}
        """,
        c=f"""
            path: /v1/completions
            models: ["llama-*"]
            upstream: http://127.0.0.1:{dead}/v1/completions
        """,
    ))
    data = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["owned_by"]) for m in data] == [("qwen2.5-72b", "a"), ("qwen2.5-7b", "b")]
    (asked,) = upstream.requests  # once: the next list comes from the cache
    assert (asked.method, asked.path) == ("GET", "/v1/models")
    assert httpx.get(f"{base}/v1/models").json()["data"] == data
    assert len(upstream.requests) == 1


def test_check_probe_asks_the_health_path_and_calls_a_404_not_openai(upstream, routes_dir, capsys):
    """`health.path` is what the proxy itself asks, so `--probe` asks it too; a server that
    answers 404 to /v1/models is not an OpenAI-compatible server, not "up" (issue 21)."""
    from proxy.cli import main as cli

    folder = routes_dir(h=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        health: {{path: /health}}
    """)
    assert cli(["check", "--routes", str(folder), "--probe"]) == 0
    assert re.search(r"\[up: GET /health 200 in \d+ ms \(health\.path\)\]", capsys.readouterr().out)
    assert not [q for q in upstream.requests if q.path == "/v1/models"]

    elsewhere = routes_dir(h=f"""
        path: /v1/completions
        upstream: {upstream.url}/elsewhere/v1/completions
    """)  # the mock answers 404 to /elsewhere/v1/models
    assert cli(["check", "--routes", str(elsewhere), "--probe"]) == 4
    out = capsys.readouterr().out
    assert re.search(r"\[down: GET /elsewhere/v1/models 404 in \d+ ms: not an OpenAI-compatible server", out), out
