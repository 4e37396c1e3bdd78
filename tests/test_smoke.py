import httpx


def test_passthrough_non_stream_and_stream(upstream, routes_dir, proxy_for):
    folder = routes_dir(c=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        default_headers: {{Authorization: Bearer s3cret}}
    """)
    base = proxy_for(folder)
    r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"}, headers={"authorization": "Bearer client"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello from the mock upstream."
    assert upstream.requests[-1].headers["authorization"] == "Bearer s3cret"
    with httpx.stream("POST", f"{base}/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}) as r:
        body = b"".join(r.iter_raw())
    assert body.endswith(b"data: [DONE]\n\n")
