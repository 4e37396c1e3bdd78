"""`upstream_model: auto`: a route learns the model its upstream serves from `GET /v1/models`
(vLLM and llama.cpp list what they serve; vLLM answers 404 to any other name), and the
shipped routes use it, so a stock vLLM serves the quickstart's `model="qwen"`."""

from __future__ import annotations

import json

import httpx
import openai

from proxy import served
from proxy.app import create_app
from proxy.routes import RouteTable
from servers import run_app

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _route(upstream, extra: str = "", adapter: str = "passthrough") -> str:
    return f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        adapter: {adapter}
        upstream_model: auto
        {extra}
    """


def test_the_route_sends_the_one_model_its_upstream_serves(upstream, routes_dir, proxy_for):
    served._cache.clear()
    base = proxy_for(routes_dir(r=_route(upstream)))
    for _ in range(3):
        r = httpx.post(f"{base}/v1/completions", json={"model": "qwen", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "qwen"  # the client's own name comes back
    assert [json.loads(q.body)["model"] for q in upstream.requests if q.path == "/v1/completions"] == ["mock"] * 3
    assert sum(q.path == "/v1/models" for q in upstream.requests) == 1, "the list is cached"


def test_several_or_no_models_are_a_clear_502(upstream, routes_dir, proxy_for):
    served._cache.clear()
    base = proxy_for(routes_dir(r=_route(upstream, 'default_headers: {x-mock-models: "a,b"}')))
    r = httpx.post(f"{base}/v1/completions", json={"model": "qwen", "prompt": "hi"})
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "upstream_model_unknown"
    assert "lists 2 models ('a', 'b')" in err["message"] and "set `upstream_model:`" in err["message"]
    assert not [q for q in upstream.requests if q.path == "/v1/completions"], "nothing was generated"


def test_a_server_without_v1_models_is_named(upstream, routes_dir, proxy_for):
    served._cache.clear()
    base = proxy_for(routes_dir(r=f"""
        path: /v1/completions
        upstream: {upstream.url}/elsewhere/v1/completions
        upstream_model: auto
    """))  # the mock answers 404 to GET /elsewhere/v1/models
    err = httpx.post(f"{base}/v1/completions", json={"model": "qwen", "prompt": "hi"}).json()["error"]
    assert err["code"] == "upstream_model_unknown" and "not an OpenAI-compatible server" in err["message"]


def test_the_shipped_routes_list_one_model_and_serve_the_quickstart(upstream, monkeypatch):
    """Four shipped routes, one upstream: /v1/models lists the model it serves, once; the
    quickstart's `model="qwen"` reaches the upstream under that name."""
    served._cache.clear()
    monkeypatch.setenv("QWEN_BASE_URL", upstream.url)
    table = RouteTable.from_dir(ROOT / "routes.d")
    assert {r.config.upstream_model for r in table.routes} == {"auto"}
    with run_app(create_app(table)) as base:
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["mock"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.model == "qwen"
    sent = [json.loads(q.body)["model"] for q in upstream.requests if q.path == "/v1/completions"]
    assert sent == ["mock"]


def test_renaming_splices_a_model_named_first_and_equals_a_full_decode():
    """The learnt name is spliced into bodies that name `model` first (the ones the proxy builds); the
    result is what decoding and encoding the body gives, for names and prompts full of escapes."""
    import random

    rng = random.Random(7)
    alphabet = ['"', "\\", "a", "é", "\n", "}", ",", ":", "\u2028", "model", '{"model":"x"}']
    for _ in range(2000):
        names = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6))) for _ in range(2)]
        doc = {"model": names[0], "prompt": "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))}
        if rng.random() < 0.3:
            doc = {"prompt": doc["prompt"], "model": doc["model"]}  # not first: the slow path
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5, separators=(",", ":")).encode()
        out = served.rename(body, names[1])
        assert json.loads(out) == {**doc, "model": names[1]}, (body, names[1], out)
    assert served.rename(b'{"model":"auto","prompt":"' + b"x" * 100 + b'"}', "qwen").startswith(b'{"model":"qwen",')
    for kept in (b"[1]", b"not json", b'{"prompt":"p"}'):
        assert served.rename(kept, "qwen") == kept


def test_the_bodies_the_proxy_builds_name_the_model_first(upstream, routes_dir, proxy_for):
    """Chat-to-completions and passthrough bodies reach an `auto` upstream with `model` first (what
    the splice above needs) and the served name in it."""
    served._cache.clear()
    for adapter, path, body in (
        ("chat-to-completions", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "any"}),
        ("passthrough", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "model": "any"}),
    ):
        text = _route(upstream, adapter=adapter).replace("path: /v1/completions", f"path: {path}", 1)
        base = proxy_for(routes_dir(r=text))
        r = httpx.post(f"{base}{path}", json=body, timeout=10)
        assert r.status_code == 200, r.text
        sent = [q.body for q in upstream.requests if q.path == "/v1/completions"][-1]
        assert sent.startswith('{"model":"mock",'), sent[:80]
