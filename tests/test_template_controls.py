"""vLLM's chat template controls on the chat route: `add_generation_prompt` and
`continue_final_message` shape the prompt (as transformers' `apply_chat_template` renders them),
`documents` and `chat_template` are refused by name, and none of the four reaches the upstream
(a completions server would ignore them, and the prompt would still open a fresh assistant turn)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import openai
import pytest

from proxy.adapters.core_types import ChatRequest
from proxy.adapters.templates import load_template, render_prompt
from test_dialects import USER, client, fake, last_body, serve  # noqa: F401 (fixtures)
from test_template_reference import FAMILIES, reference_messages, tokenizer_folder

CONTROLS = ("add_generation_prompt", "continue_final_message", "documents", "chat_template")
PREFILL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
           {"role": "assistant", "content": "The answer is"}]
CLOSED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


# --- the prompt, against transformers ----------------------------------------------------------------------

@pytest.fixture
def reference(tmp_path, monkeypatch):
    """`reference(config)(messages, add_generation_prompt, continue_final_message)` -> transformers' prompt."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    def make(config: dict[str, Any]):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(tmp_path, config)))
        return lambda messages, add, cont: tokenizer.apply_chat_template(
            reference_messages(messages), tokenize=False, add_generation_prompt=add, continue_final_message=cont)

    return make


def ours(template, messages, add, cont) -> str:
    parsed = msgspec.convert({"messages": messages}, ChatRequest).messages
    return render_prompt(template, parsed, None, None, add_generation_prompt=add, continue_final_message=cont)


@pytest.mark.parametrize(("messages", "add", "cont"), [(PREFILL, False, True), (CLOSED, False, False),
                                                       (USER, False, False)], ids=["continue", "closed", "user"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_controls_render_as_transformers_does(family, messages, add, cont, reference, tmp_path):
    template = load_template(str(tokenizer_folder(tmp_path, FAMILIES[family]) / "tokenizer_config.json"))
    expected = reference(FAMILIES[family])(messages, add, cont)
    assert ours(template, messages, add, cont) == expected
    if cont:
        assert expected.endswith("The answer is")  # right after the content: no end of turn


@pytest.mark.parametrize(("messages", "add", "cont"), [(PREFILL, False, True), (CLOSED, False, False)])
@pytest.mark.parametrize(("builtin", "family"), [("qwen2.5", "qwen2.5"), ("qwen3", "qwen3")])
def test_builtin_templates_take_the_controls_too(builtin, family, messages, add, cont, reference):
    assert ours(load_template(builtin), messages, add, cont) == reference(FAMILIES[family])(messages, add, cont)


# --- the chat route, over the vLLM fake, with the official client ----------------------------------------

def test_continue_final_message_continues_the_assistant_message(fake, serve):
    up = fake("vllm")
    c = client(serve(up, "vllm"))
    r = c.chat.completions.create(model="m", messages=PREFILL, max_tokens=5,
                                  extra_body={"continue_final_message": True, "add_generation_prompt": False},
                                  extra_headers={"x-mock-text-json": json.dumps(" 4.")})
    assert r.choices[0].message.content == " 4."
    sent = last_body(up)
    assert sent["prompt"].endswith("<|im_start|>assistant\nThe answer is")
    assert not any(k in sent for k in CONTROLS)
    # Unsaid, `add_generation_prompt` follows `continue_final_message` (no new turn when continuing).
    c.chat.completions.create(model="m", messages=PREFILL, max_tokens=5, extra_body={"continue_final_message": True})
    assert last_body(up)["prompt"].endswith("assistant\nThe answer is")


def test_add_generation_prompt_false_ends_after_the_last_turn(fake, serve):
    up = fake("vllm")
    c = client(serve(up, "vllm"))
    c.chat.completions.create(model="m", messages=CLOSED, max_tokens=5, extra_body={"add_generation_prompt": False})
    sent = last_body(up)
    assert sent["prompt"].endswith("<|im_start|>assistant\nHello.<|im_end|>\n") and "add_generation_prompt" not in sent
    c.chat.completions.create(model="m", messages=CLOSED, max_tokens=5, extra_body={"add_generation_prompt": True})
    assert last_body(up)["prompt"].endswith("Hello.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("messages", "extra", "param", "words"), [
    (PREFILL, {"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message", "Cannot set both"),
    (USER, {"continue_final_message": True}, "continue_final_message", "assistant's"),
    (USER, {"documents": [{"title": "t", "text": "x"}]}, "documents", "documents"),
    (USER, {"chat_template": "{{ messages }}"}, "chat_template", "did not approve"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(fake, serve, messages, extra, param, words):
    up = fake("vllm")
    with pytest.raises(openai.BadRequestError) as err:
        client(serve(up, "vllm")).chat.completions.create(model="m", messages=messages, extra_body=extra)
    assert err.value.body["param"] == param and words in err.value.message
    assert not up.requests


@pytest.mark.parametrize("dialect", ["llama.cpp", "sglang"])
def test_the_controls_are_never_forwarded(fake, serve, dialect):
    up = fake(dialect)
    client(serve(up, dialect)).chat.completions.create(
        model="m", messages=CLOSED, max_tokens=5, extra_body={"add_generation_prompt": True,
                                                              "continue_final_message": False})
    assert not any(k in last_body(up) for k in CONTROLS)
    assert json.dumps(last_body(up)["prompt"]).endswith('<|im_start|>assistant\\n"')
