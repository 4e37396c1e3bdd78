"""The proxy's prompts against `transformers`' own chat-template renderer.

The reference is `PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)` of the
installed transformers (5.x: `tokenization_utils_base.py`), on a tokenizer loaded offline by
`AutoTokenizer.from_pretrained` from a folder holding the fixture's `tokenizer_config.json` and
a one-word `tokenizer.json` made here: transformers itself reads the config (template string
or named list, special tokens as strings or AddedToken objects), picks the template, drops
`None` fields, adds the special tokens and kwargs, renders. Nothing is downloaded.

Messages reach both in the form vLLM renders an OpenAI request: `content: null` as "" and
tool-call arguments parsed from their JSON string (`vllm/entrypoints/chat_utils.py`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

pytest.importorskip("transformers")

from proxy.adapters.core_types import ChatRequest  # noqa: E402
from proxy.adapters.templates import load_template  # noqa: E402
from proxy.errors import BadRequest, TemplateFailed  # noqa: E402

DATA = Path(__file__).parent / "data"
QWEN_SPECIAL = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}  # Qwen2.5 / Qwen3 configs

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "名前"}},
                       "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {}}}}


def call(id_: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


# (name, messages, tools, chat_template_kwargs)
CONVERSATIONS: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any] | None]] = [
    ("user only", [{"role": "user", "content": "Hi"}], None, None),
    ("system and user", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None, None),
    ("multi-turn", [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
    ], None, None),
    ("text parts and a name", [
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
    ], None, None),
    ("tools, no system", [{"role": "user", "content": "Weather in Zürich?"}], [WEATHER], None),
    ("tools and system", [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather?"}],
     [WEATHER, TIME], None),
    ("one call and its result", [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("a", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "a", "content": "21 °C"},
    ], [WEATHER], None),
    ("call, result, answer, next question", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("a", "get_weather", '{"city":"Paris"}')]},
        {"role": "tool", "tool_call_id": "a", "content": "21"},
        {"role": "assistant", "content": "It is 21 °C."},
        {"role": "user", "content": "And the time?"},
    ], [WEATHER, TIME], None),
    ("parallel calls and results", [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            call("a", "get_weather", '{"city": "Paris"}'), call("b", "get_weather", '{"city": "Zürich"}')]},
        {"role": "tool", "tool_call_id": "a", "content": "21"},
        {"role": "tool", "tool_call_id": "b", "content": "18"},
    ], [WEATHER], None),
    ("reasoning of an earlier turn", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
        {"role": "user", "content": "3+3?"},
    ], None, None),
    ("reasoning inline in an earlier turn", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4."},
        {"role": "user", "content": "3+3?"},
    ], None, None),
    ("reasoning in the current tool loop", [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
         "tool_calls": [call("a", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "a", "content": "21"},
    ], [WEATHER], None),
    ("thinking off", [{"role": "user", "content": "Hi"}], None, {"enable_thinking": False}),
    ("thinking on", [{"role": "user", "content": "Hi"}], None, {"enable_thinking": True}),
    ("thinking off with tools", [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather?"}],
     [WEATHER], {"enable_thinking": False}),
    ("late system message", [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "system", "content": "late"}, {"role": "user", "content": "b"},
    ], None, None),
    ("template variables from the request", [{"role": "system", "content": " padded "}, {"role": "user", "content": "Hi"}],
     [TIME], {"date_string": "01 Jan 2025", "tools_in_user_message": False}),
]


def reference_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What vLLM hands the template for an OpenAI request: text content, argument objects."""
    out = copy.deepcopy(messages)
    for m in out:
        content = m.get("content")
        if content is None:
            m["content"] = ""
        elif isinstance(content, list):
            m["content"] = "\n".join(part["text"] for part in content)
        for c in m.get("tool_calls") or ():
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def tokenizer_folder(tmp_path: Path, config: dict[str, Any]) -> Path:
    from tokenizers import Tokenizer, models

    folder = tmp_path / "tokenizer"
    folder.mkdir(exist_ok=True)
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """`hf(config)` -> a render function backed by transformers' `apply_chat_template`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    def make(config: dict[str, Any]):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(tmp_path, config)))

        def render(messages, tools, kwargs):
            return tokenizer.apply_chat_template(reference_messages(messages), tools=tools, tokenize=False,
                                                 add_generation_prompt=True, **(kwargs or {}))

        return render

    return make


def ours(template, messages, tools, kwargs) -> str:
    parsed = msgspec.convert({"messages": messages}, ChatRequest).messages
    return template.render(parsed, tools, kwargs)


def same_as_transformers(template, reference, messages, tools, kwargs) -> None:
    """Equal prompts, or both refuse: transformers with a TemplateError from the template's
    `raise_exception`, the proxy with a 400 carrying the same reason."""
    import jinja2

    try:
        expected = reference(messages, tools, kwargs)
    except jinja2.TemplateError as exc:
        with pytest.raises(BadRequest, match="rejected the conversation") as refused:
            ours(template, messages, tools, kwargs)
        assert str(exc) in refused.value.message
        return
    assert ours(template, messages, tools, kwargs) == expected


FAMILIES = {
    "qwen2.5": {"chat_template": (DATA / "qwen2.5-instruct.jinja").read_text(encoding="utf-8"), **QWEN_SPECIAL},
    "qwen3": {"chat_template": (DATA / "qwen3.jinja").read_text(encoding="utf-8"), **QWEN_SPECIAL},
    "llama3.1": json.loads((DATA / "llama-3.1-instruct" / "tokenizer_config.json").read_text(encoding="utf-8")),
}
CASES = [(f, *c) for f in FAMILIES for c in CONVERSATIONS]


@pytest.mark.parametrize(("family", "name", "messages", "tools", "kwargs"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_tokenizer_config_renders_as_transformers_does(family, name, messages, tools, kwargs, hf, tmp_path):
    folder = tokenizer_folder(tmp_path, FAMILIES[family])
    template = load_template(str(folder / "tokenizer_config.json"))
    same_as_transformers(template, hf(FAMILIES[family]), messages, tools, kwargs)


@pytest.mark.parametrize(("name", "messages", "tools", "kwargs"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_builtin_qwen3_renders_as_transformers_does(name, messages, tools, kwargs, hf):
    same_as_transformers(load_template("qwen3"), hf(FAMILIES["qwen3"]), messages, tools, kwargs)


@pytest.mark.parametrize(("name", "messages", "tools", "kwargs"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_builtin_qwen25_renders_as_transformers_does(name, messages, tools, kwargs, hf):
    same_as_transformers(load_template("qwen2.5"), hf(FAMILIES["qwen2.5"]), messages, tools, kwargs)


def test_builtin_qwen3_is_the_fixture_to_the_character():
    from proxy.adapters import templates

    assert templates._QWEN3.read_bytes() == (DATA / "qwen3.jinja").read_bytes()


def test_the_comparison_can_fail(hf):
    """The reference sees kwargs and reasoning: a proxy that dropped either would differ."""
    reference = hf(FAMILIES["qwen3"])
    off = reference([{"role": "user", "content": "Hi"}], None, {"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off != reference([{"role": "user", "content": "Hi"}], None, None)
    loop = CONVERSATIONS[11][1]
    assert "I should call the tool." in reference(loop, [WEATHER], None)


def test_named_templates_pick_tool_use_for_requests_with_tools(hf, tmp_path):
    config = {
        "chat_template": [
            {"name": "default", "template": FAMILIES["qwen2.5"]["chat_template"]},
            {"name": "tool_use", "template": FAMILIES["qwen3"]["chat_template"]},
            {"name": "rag", "template": "{{ raise_exception('never used') }}"},
        ],
        **QWEN_SPECIAL,
    }
    folder = tokenizer_folder(tmp_path, config)
    template = load_template(str(folder / "tokenizer_config.json"))
    reference = hf(config)
    plain = [{"role": "user", "content": "Hi"}]
    assert ours(template, plain, None, None).startswith("<|im_start|>system\nYou are Qwen")  # default: Qwen2.5
    assert ours(template, plain, [WEATHER], None).startswith("<|im_start|>system\n# Tools")  # tool_use: Qwen3
    for _, messages, tools, kwargs in CONVERSATIONS:
        same_as_transformers(template, reference, messages, tools, kwargs)


def test_added_token_objects_and_bos_attribute(hf, tmp_path):
    config = dict(FAMILIES["llama3.1"])
    config["bos_token"] = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False,
                           "normalized": False, "rstrip": False, "single_word": False, "special": True}
    folder = tokenizer_folder(tmp_path, config)
    template = load_template(str(folder / "tokenizer_config.json"))
    messages = [{"role": "user", "content": "Hi"}]
    assert ours(template, messages, None, None) == hf(config)(messages, None, None)
    assert ours(template, messages, None, None).startswith("<|begin_of_text|><|start_header_id|>system")
    assert template.bos_token == "<|begin_of_text|>"
    assert "<|eot_id|>" in template.stops
    assert load_template("qwen3").bos_token == "" and load_template("chatml").bos_token == ""


def test_llama_parallel_calls_are_the_clients_to_fix():
    template = load_template(str(DATA / "llama-3.1-instruct" / "tokenizer_config.json"))
    with pytest.raises(BadRequest) as refused:
        ours(template, CONVERSATIONS[8][1], [WEATHER], None)
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert "only supports single tool-calls" in refused.value.message


def test_template_bug_is_the_routes_fault(tmp_path, caplog):
    path = tmp_path / "buggy.jinja"
    # Renders the sample conversation, breaks on an assistant turn: a bug only a real request finds.
    path.write_text("{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content.nope() }}{% endif %}"
                    "{{ m.content }}{% endfor %}")
    template = load_template(str(path), "routes.d/chat.yaml", route="chat")
    with caplog.at_level("ERROR", logger="llmproxy"), pytest.raises(TemplateFailed) as failed:
        ours(template, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None, None)
    assert failed.value.status == 500 and failed.value.code == "template_failed"
    assert "route 'chat'" in failed.value.message and "buggy.jinja" in failed.value.message
    assert any("chat template buggy.jinja failed" in r.getMessage() for r in caplog.records)
