"""`reasoning: think` routes stream an answer that does not think as it comes, on every face.

The proxy renders the prompt, so it knows whether the template pre-filled `<think>`: when it did not
and the answer does not open with `<think>`, the text is the answer. Only a start that could still
be the tag is held. Measured without clocks: how many upstream reads the relay had taken when the
first answer text reached the client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy.adapters.registry import make_adapter
from proxy.config import RouteConfig

FACES = {
    "chat-to-completions": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    "messages-to-completions": ("/v1/messages", {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}),
    "responses-to-completions": ("/v1/responses", {"input": "Hi"}),
}


def call_for(adapter: str, template: str | None = None) -> Any:
    path, doc = FACES[adapter]
    extra = {"template": template} if template else {}
    config = RouteConfig(name="r", path=path, upstream="http://127.0.0.1:9/v1/completions", adapter=adapter,
                         reasoning="think", **extra)
    return make_adapter(config).request(json.dumps({"model": "qwen", "stream": True, **doc}).encode())


def event(text: str, finish: str | None = None) -> bytes:
    return b"data: " + json.dumps({"id": "cmpl-abc", "created": 1700000000,
                                   "choices": [{"index": 0, "text": text, "finish_reason": finish}]}).encode() + b"\n\n"


def answer_text(out: bytes) -> str:
    """The answer text in a face's stream output (chat deltas, Messages text deltas, Responses text deltas)."""
    text = ""
    for block in out.split(b"\n\n"):
        for line in block.split(b"\n"):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "choices" in doc:
                for c in doc["choices"]:
                    text += c.get("delta", {}).get("content") or ""
            elif doc.get("type") == "content_block_delta" and doc["delta"].get("type") == "text_delta":
                text += doc["delta"]["text"]
            elif doc.get("type") == "response.output_text.delta":
                text += doc["delta"]
    return text


def reads_before_text(call: Any, chunks: list[bytes]) -> tuple[int, str]:
    """Upstream reads taken when answer text first went out, and all the answer text."""
    taken = 0
    first: int | None = None

    async def source():
        nonlocal taken
        for c in chunks:
            taken += 1
            yield c

    async def run() -> str:
        nonlocal first
        text = ""
        async for out in call.events(source()):
            piece = answer_text(out)
            if piece and first is None:
                first = taken
            text += piece
        return text

    text = asyncio.run(run())
    assert first is not None, "no answer text at all"
    return first, text


ANSWER = [event("Paris"), event(" is the"), event(" capital."), event("", "stop"), b"data: [DONE]\n\n"]


@pytest.mark.parametrize("adapter", list(FACES))
def test_an_answer_without_think_streams_at_once(adapter):
    first, text = reads_before_text(call_for(adapter), ANSWER)
    assert first == 1
    assert text == "Paris is the capital."


@pytest.mark.parametrize("adapter", list(FACES))
def test_a_start_that_could_still_be_the_tag_is_held_only_until_it_cannot(adapter):
    chunks = [event("  <thi"), event("s is"), event(" not a tag"), event("", "stop"), b"data: [DONE]\n\n"]
    first, text = reads_before_text(call_for(adapter), chunks)
    assert first == 2
    assert text == "  <this is not a tag"


@pytest.mark.parametrize("adapter", list(FACES))
def test_a_thought_still_splits_from_the_answer(adapter):
    chunks = [event("<think>Capital"), event(" of France.</think>"), event("\n\nParis."), event("", "stop"),
              b"data: [DONE]\n\n"]
    first, text = reads_before_text(call_for(adapter), chunks)
    assert (first, text) == (3, "Paris.")


def test_a_template_that_prefills_think_still_splits_an_unopened_thought(tmp_path):
    path = tmp_path / "prefill.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    chunks = [event("Capital of France."), event("</think>\n\nParis."), event("", "stop"), b"data: [DONE]\n\n"]
    first, text = reads_before_text(call_for("chat-to-completions", str(path)), chunks)
    assert (first, text) == (2, "Paris.")
