"""The test subject itself: the engine serves the tiny model with the real Qwen2.5 template."""

from __future__ import annotations

from pathlib import Path

import httpx

from conftest import Engine

TEMPLATE = (Path(__file__).resolve().parents[1] / "data" / "qwen2.5-instruct.jinja").read_text()


def test_engine_serves_the_qwen25_template(engine: Engine) -> None:
    props = httpx.get(f"{engine.url}/props", timeout=10).json()
    assert props["chat_template"] == TEMPLATE.rstrip("\n")  # the engine drops the final newline


def test_greedy_answers_vary_with_the_prompt_and_end(engine: Engine) -> None:
    """A usable subject: different prompts, different answers; some end on <|im_end|> by themselves."""
    answers, finishes = set(), []
    for q in ("Hello there", "What is the capital of France?", "Tell me a joke about cats", "Why is the sky blue?"):
        body = {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 80}
        choice = httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        answers.add(choice["message"]["content"])
        finishes.append(choice["finish_reason"])
        assert "<|" not in choice["message"]["content"] and "\ufffd" not in choice["message"]["content"]
    assert len(answers) == 4
    assert "stop" in finishes
