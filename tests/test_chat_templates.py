"""Prompt rendering: built-in ChatML / Qwen2.5 against expected strings and the published Qwen2.5 template."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.adapters.core_types import ChatRequest
from proxy.adapters.templates import ChatML, jinja_environment, load_template
from proxy.errors import BadRequest, ConfigError, TemplateFailed

DATA = Path(__file__).parent / "data"
QWEN_REF = DATA / "qwen2.5-instruct.jinja"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def msgs(*messages: dict[str, Any]) -> list[Any]:
    return msgspec.convert({"messages": list(messages)}, ChatRequest).messages


def reference(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The published Qwen2.5-Instruct template, rendered the way `apply_chat_template` does.

    Like vLLM, tool-call arguments go in as objects (OpenAI sends them as JSON strings).
    """
    messages = copy.deepcopy(messages)
    for m in messages:
        for call in m.get("tool_calls") or ():
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    template = jinja_environment().from_string(QWEN_REF.read_text())
    return template.render(messages=messages, tools=tools, add_generation_prompt=True)


def test_chatml_turns():
    prompt = ChatML().render(msgs(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ), None)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_without_system_adds_none():
    assert ChatML().render(msgs({"role": "user", "content": "Hi"}), None) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_empty_system_is_kept_as_an_empty_turn():
    assert ChatML().render(msgs({"role": "system", "content": ""}, {"role": "user", "content": "Hi"}), None) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_list_of_text_parts_joined_by_newlines():
    prompt = ChatML().render(msgs({"role": "user", "content": [
        {"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}), None)
    assert prompt == "<|im_start|>user\nfirst\nsecond<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_tools_without_system_open_with_the_tools_block():
    prompt = ChatML().render(msgs({"role": "user", "content": "Weather in Paris?"}), [WEATHER])
    assert prompt == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER, ensure_ascii=False) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "°C" in prompt  # tojson keeps non-ASCII text, as Hugging Face's does


def test_tool_round_trip_rendering_expected_string():
    prompt = ChatML().render(msgs(
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ), [WEATHER, TIME])
    assert prompt.endswith(
        "<|im_start|>user\nWeather and time in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n21 °C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.startswith("<|im_start|>system\nS\n\n# Tools\n")


CONVERSATIONS: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ("user only", [{"role": "user", "content": "Hi"}], None),
    ("system", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    ("multi-turn", [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "system", "content": "late system"}, {"role": "user", "content": "d"},
    ], None),
    ("tools, no system", [{"role": "user", "content": "Weather?"}], [WEATHER]),
    ("tools and system", [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather?"}],
     [WEATHER, TIME]),
    ("tool round trip", [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "21"},
        {"role": "tool", "tool_call_id": "b", "content": "18"},
        {"role": "assistant", "content": "Paris 21, Zürich 18."},
        {"role": "user", "content": "And the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "12:00"},
    ], [WEATHER, TIME]),
    ("tool results without tools listed", [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"n": [1, 2.5, null]}'}}]},
        {"role": "tool", "content": "ok"},
    ], None),
]


@pytest.mark.parametrize(("name", "conversation", "tools"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_builtin_qwen25_matches_the_published_template(name, conversation, tools):
    assert load_template("qwen2.5").render(msgs(*conversation), tools) == reference(conversation, tools)


@pytest.mark.parametrize(("name", "conversation", "tools"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_chatml_matches_the_published_template_when_a_system_message_leads(name, conversation, tools):
    conversation = conversation if conversation[0]["role"] == "system" else (
        [{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}]
        + conversation)
    assert ChatML().render(msgs(*conversation), tools) == reference(conversation, tools)


def test_jinja_file_template_gets_messages_tools_and_generation_prompt(tmp_path):
    path = tmp_path / "qwen.jinja"
    path.write_text(QWEN_REF.read_text())
    template = load_template(str(path))
    for _, conversation, tools in CONVERSATIONS:
        assert template.render(msgs(*conversation), tools) == reference(conversation, tools)
    assert template.stops == ("<|im_end|>", "<|endoftext|>")


def test_jinja_template_stops_follow_its_family(tmp_path):
    path = tmp_path / "llama.jinja"
    path.write_text("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                    "{{ m.content }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert load_template(str(path)).stops == ("<|eot_id|>",)


def test_jinja_template_raise_exception_is_a_400(tmp_path):
    path = tmp_path / "strict.jinja"
    path.write_text("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}"
                    "{% endif %}{{ messages[0].content }}")
    with pytest.raises(BadRequest, match="first message must be user") as refused:
        load_template(str(path)).render(msgs({"role": "system", "content": "x"}), None)
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, "messages", "template_rejected")


def test_jinja_template_is_sandboxed(tmp_path):
    path = tmp_path / "evil.jinja"
    path.write_text("{% if messages|length > 1 %}{{ messages.__class__.__mro__[1].__subclasses__() }}{% endif %}")
    template = load_template(str(path))  # the sample conversation (one message) renders
    with pytest.raises(TemplateFailed):  # the template's fault: a 500, not the client's 400
        template.render(msgs({"role": "user", "content": "x"}, {"role": "user", "content": "y"}), None)
    path.write_text("{% set ns = namespace(_x=1) %}{{ ns }}")
    with pytest.raises(ConfigError, match="may not start with '_'"):
        load_template(str(path))


def test_jinja_syntax_error_is_a_config_error_naming_the_route(tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{% if %}")
    with pytest.raises(ConfigError, match=r"routes.d/x.yaml: template: .*broken.jinja:1"):
        load_template(str(path), "routes.d/x.yaml")


def test_tojson_like_hugging_face():
    env = jinja_environment()
    out = env.from_string("{{ x | tojson }}").render(x={"b": "ü<", "a": 1})
    assert out == '{"b": "ü<", "a": 1}'  # key order kept, no ASCII or HTML escaping


def test_route_names_a_template_file_next_to_it(routes_dir):
    from proxy.routes import RouteTable

    folder = routes_dir(chat="""
        path: /v1/chat/completions
        upstream: http://127.0.0.1:9/v1/completions
        adapter: chat-to-completions
        template: qwen.jinja
    """)
    (folder / "qwen.jinja").write_text(QWEN_REF.read_text())
    route, _ = RouteTable.from_dir(folder).match("POST", "/v1/chat/completions", b"{}")
    call = route.adapter.request(b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}')
    assert json.loads(call.body)["prompt"] == reference([{"role": "user", "content": "Hi"}])


def test_route_with_a_broken_template_fails_to_load_naming_the_route_file(routes_dir):
    from proxy.routes import RouteTable

    folder = routes_dir(chat="""
        path: /v1/chat/completions
        upstream: http://127.0.0.1:9/v1/completions
        adapter: chat-to-completions
        template: broken.jinja
    """)
    (folder / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"chat.yaml: template: .*broken.jinja"):
        RouteTable.from_dir(folder)


CHAT_ROUTE = """
    path: /v1/chat/completions
    upstream: http://127.0.0.1:9/v1/completions
    adapter: chat-to-completions
    template: {template}
"""


def test_check_renders_a_sample_conversation_through_each_chat_template(routes_dir):
    from proxy.cli import main

    folder = routes_dir(chat=CHAT_ROUTE.format(template="needs-a-system.jinja"))
    # Compiles, but breaks on any conversation that does not open with a system message.
    (folder / "needs-a-system.jinja").write_text("{{ messages[0].content.upper() }}{{ messages[1].content }}")
    proc = subprocess.run([sys.executable, "-m", "proxy", "check", "--routes", str(folder)], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "QWEN_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 2
    assert f"{folder / 'chat.yaml'}: template: needs-a-system.jinja: cannot render a sample conversation " \
           "(one user message)" in proc.stderr
    assert "UndefinedError" in proc.stderr
    (folder / "needs-a-system.jinja").write_text("{{ messages[0].content }}")
    assert main(["check", "--routes", str(folder)]) == 0


def test_a_template_that_refuses_the_sample_is_a_config_error(routes_dir):
    from proxy.routes import RouteTable

    folder = routes_dir(chat=CHAT_ROUTE.format(template="strict.jinja"))
    (folder / "strict.jinja").write_text("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}"
                                         "{% endif %}")
    with pytest.raises(ConfigError, match=r"chat.yaml: template: strict.jinja: cannot render a sample "
                                          r"conversation \(one user message\): it raised system first"):
        RouteTable.from_dir(folder)


def test_tokenizer_config_tool_use_entry_must_render_one_tool(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "{{ messages[0].content }}"},
        {"name": "tool_use", "template": "{{ tools[0].function.nope.deeper }}"},
    ]}))
    with pytest.raises(ConfigError, match=r"r.yaml: template: tokenizer_config.json: cannot render a sample "
                                          r"conversation \(one user message and one tool\)"):
        load_template(str(config), "r.yaml")


@pytest.mark.parametrize(("config", "reason"), [
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, "no 'default' entry \\(it has 'tool_use'\\)"),
    ({"chat_template": [{"name": "default"}]}, r"chat_template\[0\]: expected"),
    ({"chat_template": 3}, "expected a string or a list of named templates, got int"),
    ({"bos_token": 1, "chat_template": "x"}, "bos_token: expected a string or an AddedToken object"),
    ({"eos_token": "</s>"}, "has no chat_template, and there is no chat_template.jinja beside it"),
    ([], "expected a JSON object"),
])
def test_bad_tokenizer_config_is_a_config_error_naming_the_reason(tmp_path, config, reason):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"r.yaml: template: .*{reason}"):
        load_template(str(path), "r.yaml")


def test_tokenizer_config_without_template_uses_chat_template_jinja_beside_it(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text(QWEN_REF.read_text())
    template = load_template(str(tmp_path / "tokenizer_config.json"))
    assert template.render(msgs({"role": "user", "content": "Hi"}), None) == reference([{"role": "user", "content": "Hi"}])


def test_chat_template_kwargs_reach_the_template_but_cannot_replace_the_proxys_variables(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}{% if enable_thinking is defined and enable_thinking is false %}"
                    " /no_think{% endif %}")
    template = load_template(str(path))
    hi = msgs({"role": "user", "content": "Hi"})
    assert template.render(hi, None, {"enable_thinking": False}) == "Hi /no_think"
    assert template.render(hi, None) == "Hi"
    with pytest.raises(BadRequest, match="'messages' is set by the proxy") as refused:
        template.render(hi, None, {"messages": []})
    assert refused.value.param == "chat_template_kwargs"


def test_builtin_qwen3_route_loads(routes_dir):
    from proxy.routes import RouteTable

    folder = routes_dir(chat=CHAT_ROUTE.format(template="qwen3"))
    route, _ = RouteTable.from_dir(folder).match("POST", "/v1/chat/completions", b"{}")
    call = route.adapter.request(b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}')
    body = json.loads(call.body)
    assert body["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert body["stop"] == ["<|im_end|>", "<|endoftext|>"]


TEXTS = st.sampled_from(["Hi", "", "  spaced  ", "ü 名前", "<think>\nhmm\n</think>\n\nok", "</think>x",
                         "<tool_response>\n21\n</tool_response>", "<tool_response>x", "a\n\nb"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXTS},
                                          optional={"reasoning_content": TEXTS}), min_size=1, max_size=6)
KWARGS = st.sampled_from([None, {}, {"enable_thinking": False}, {"enable_thinking": True}, {"enable_thinking": 0},
                          {"other": 1}])


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, kwargs=KWARGS)
def test_qwen3_plain_turn_path_equals_the_template(messages, kwargs):
    from proxy.adapters.templates import JinjaTemplate

    qwen3 = _QWEN3_TEMPLATE
    parsed = msgs(*messages)
    assert qwen3.render(parsed, None, kwargs) == JinjaTemplate.render(qwen3, parsed, None, kwargs)


_QWEN3_TEMPLATE = load_template("qwen3")


def test_template_errors_through_the_proxy_400_for_the_client_500_for_the_route(routes_dir, proxy_for, caplog):
    import httpx

    folder = routes_dir(chat=CHAT_ROUTE.format(template="picky.jinja"))
    # Renders the sample (one user message); refuses an empty message; breaks on a second message.
    (folder / "picky.jinja").write_text(
        "{% if messages[0].content == '' %}{{ raise_exception('say something') }}{% endif %}"
        "{% if messages|length > 1 %}{{ messages[1].content.nope() }}{% endif %}{{ messages[0].content }}")
    base = proxy_for(folder)
    empty = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}]})
    assert empty.status_code == 400
    assert empty.json()["error"] == {"message": "the chat template (picky.jinja) rejected the conversation: say something",
                                     "type": "invalid_request_error", "param": "messages", "code": "template_rejected"}
    with caplog.at_level("ERROR", logger="llmproxy"):
        broken = httpx.post(f"{base}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    assert broken.status_code == 500
    error = broken.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "template_failed")
    assert "picky.jinja" in error["message"] and "UndefinedError" in error["message"]
    assert any("chat template picky.jinja failed" in r.getMessage() for r in caplog.records)
