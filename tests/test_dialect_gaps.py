"""What issue 13's audit found left over: fields consumed by the translation that reached the upstream
raw (or not at all), and fakes that accepted what the real servers refuse. Over loopback fakes
(proxy/mock_upstream.py), the official `openai` client in front."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from test_dialects import LONG, USER, client, fake, last_body, serve  # noqa: F401 (fixtures)

# --- llama.cpp: one choice only; `n_predict` does not escape the route's limit ---------------------------


def test_llama_cpp_fake_refuses_n_like_the_real_server(fake):
    up = fake("llama.cpp")
    r = httpx.post(f"{up.url}/v1/completions", json={"prompt": "Hi", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["message"] == "Only one completion choice is allowed"
    assert httpx.post(f"{up.url}/v1/completions", json={"prompt": "Hi", "n": 1}).status_code == 200


def test_llama_cpp_route_refuses_n_by_name_before_sending(fake, serve):
    up = fake("llama.cpp")
    c = client(serve(up, "llama.cpp"))
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=USER, n=2)
    assert err.value.body["param"] == "n" and "one completion choice" in err.value.message
    assert not up.requests
    c.chat.completions.create(model="m", messages=USER, n=1)
    assert last_body(up)["n"] == 1


@pytest.mark.parametrize(("n_predict", "max_tokens", "sent"), [(5000, None, 100), (50, None, 50), (50, 30, 30),
                                                               (30, 50, 30), (-1, None, 100), (-1, 20, 20)])
def test_llama_cpp_n_predict_is_folded_into_max_tokens_and_capped(fake, serve, n_predict, max_tokens, sent):
    up = fake("llama.cpp")
    c = client(serve(up, "llama.cpp", "body: {limit: {max_tokens: 100}}"))
    kw: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens is not None else {}
    r = c.chat.completions.create(model="m", messages=USER, extra_body={"n_predict": n_predict},
                                  extra_headers={"x-mock-text": " ".join(f"w{i}" for i in range(150))}, **kw)
    body = last_body(up)
    assert "n_predict" not in body and body["max_tokens"] == sent
    assert len(r.choices[0].message.content.split()) == sent and r.choices[0].finish_reason == "length"
