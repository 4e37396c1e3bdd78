"""`dialect:` and `body:` in route files, BOS per dialect, and the context lookup on the request's own upstream."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.adapters.core import Core, Generation
from proxy.adapters.core_types import Message
from proxy.cli import main
from proxy.config import RouteConfig, load_file
from proxy.errors import ConfigError
from proxy.mock_upstream import mock_tokens
from servers import free_port, run_mock

CHAT = "path: /v1/chat/completions\nupstream: http://127.0.0.1:9/v1/completions\nadapter: chat-to-completions\n"


@pytest.mark.parametrize(("extra", "expected"), [
    ("dialect: tgi\n", r"r\.yaml:4: dialect: Invalid enum value 'tgi'"),
    ("dialect: openai\n", r"r\.yaml: body\.defaults\.max_tokens: dialect openai answers 16 tokens"),
    ("dialect: openai\nbody: {defaults: {max_tokens: auto}}\n", r"r\.yaml:5: body\.defaults\.max_tokens: auto needs"),
    ("dialect: llama.cpp\nbody: {defaults: {max_tokens: auto}}\n",
     r"body\.defaults\.max_tokens: auto needs a tokenizer"),
    ("body: {defaults: {max_tokens: lots}}\n", r"r\.yaml:4: body\.defaults\.max_tokens: must be auto or a positive"),
    ("body: {set: {max_tokens: auto}}\n", r"body\.set\.max_tokens: must be a positive integer"),
    ("body: {limit: {max_tokens: 0}}\n", r"body\.limit\.max_tokens: must be auto or a positive number, got 0"),
    ("body: {limit: {max_tokens: many}}\n", r"body\.limit\.max_tokens: must be auto or a positive number, got 'many'"),
    ("body: {limit: {top_p: auto}}\n", r"body\.limit\.top_p: must be a positive number, got 'auto'"),
    ("body: {remove: user}\n", r"r\.yaml:4: body\.remove: Expected `array`"),
    ("body: {default: {}}\n", r"r\.yaml:4: body\.default: unknown field"),
])
def test_bad_dialect_and_body_keys_name_the_field(tmp_path, extra, expected):
    path = tmp_path / "r.yaml"
    path.write_text(CHAT + extra)
    with pytest.raises(ConfigError, match=expected):
        load_file(path)


def test_dialect_defaults_to_vllm_and_openai_passthrough_or_a_number_is_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(CHAT)
    assert load_file(path).dialect == "vllm"
    path.write_text(CHAT + "dialect: openai\nbody: {defaults: {max_tokens: 256}}\n")
    assert load_file(path).body.defaults == {"max_tokens": 256}
    path.write_text("path: /v1/completions\nupstream: http://127.0.0.1:9/v1/completions\ndialect: openai\n")
    assert load_file(path).dialect == "openai"


def test_an_openai_chat_route_without_a_number_stops_start_up_with_exit_2(tmp_path, capsys):
    (tmp_path / "chat.yaml").write_text(CHAT + "dialect: openai\n")
    assert main(["serve", "--routes", str(tmp_path), "--port", str(free_port())]) == 2
    assert "chat.yaml: body.defaults.max_tokens: dialect openai" in capsys.readouterr().err


# --- BOS: one, whatever the server does with the prompt ---------------------------------------------------

def core_with_bos(tmp_path: Path, dialect: str) -> Core:
    template = tmp_path / "llama.jinja"
    template.write_text("<s>{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
    extra: dict[str, Any] = {"body": {"defaults": {"max_tokens": 64}}} if dialect == "openai" else {}
    config = RouteConfig(name="r", path="/v1/chat/completions", upstream="http://127.0.0.1:9/v1/completions",
                         adapter="chat-to-completions", dialect=dialect, template=str(template), **extra)
    import msgspec

    core = Core(msgspec.convert(msgspec.to_builtins(config), RouteConfig))
    core.bos_token = "<s>"  # what the template's tokenizer config names as BOS (templates.py exposes it)
    return core


@pytest.mark.parametrize(("dialect", "prompt", "flag"), [
    ("vllm", "<s>[INST] Hi [/INST]", False),  # vLLM has a switch: keep the template's BOS, add none
    ("llama.cpp", "[INST] Hi [/INST]", None),  # llama.cpp always adds BOS: strip the template's
    ("sglang", "[INST] Hi [/INST]", None),  # SGLang always adds BOS, and has no switch
    ("openai", "<s>[INST] Hi [/INST]", None),  # unknown server: the prompt as the template wrote it
])
def test_no_double_bos_per_dialect(tmp_path, dialect, prompt, flag):
    turn = core_with_bos(tmp_path, dialect).start(Generation(messages=[Message(role="user", content="Hi")],
                                                             max_tokens=5))
    doc = json.loads(turn.body)
    assert doc["prompt"] == prompt
    assert doc.get("add_special_tokens") is flag


def test_vllm_tokenizes_with_the_same_add_special_tokens_as_it_completes(tmp_path):
    with run_mock("vllm", context=1000) as up:
        folder = tmp_path / "routes"
        folder.mkdir()
        (folder / "llama.jinja").write_text("<s>{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
        (folder / "r.yaml").write_text(f"path: /v1/chat/completions\nupstream: {up.url}/v1/completions\n"
                                       "adapter: chat-to-completions\ntemplate: llama.jinja\n")
        from proxy.app import create_app
        from proxy.routes import RouteTable
        from servers import run_app

        table = RouteTable.from_dir(folder)
        route, _ = table.match("POST", "/v1/chat/completions", b"{}")
        route.adapter.core.bos_token = "<s>"
        with run_app(create_app(table)) as base:
            openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}])
        sent = json.loads(up.requests[-1].body)
        asked = json.loads(up.lookups[-1].body)
        assert sent["add_special_tokens"] is False and asked["add_special_tokens"] is False
        # exactly the remainder: a token more (a BOS counted twice) and the fake would have refused it
        assert sent["max_tokens"] == 1000 - mock_tokens(sent["prompt"], add_special=False)


# --- the lookup goes to the request's own upstream, and fails over with it --------------------------------

def test_the_context_lookup_uses_the_upstream_the_request_goes_to(routes_dir, proxy_for):
    with run_mock("vllm", context=1000) as a, run_mock("vllm", context=2000) as b:
        dead = f"http://127.0.0.1:{free_port()}"
        base = proxy_for(routes_dir(r=f"""
            path: /v1/chat/completions
            upstream: [{dead}/v1/completions, {a.url}/v1/completions, {b.url}/v1/completions]
            adapter: chat-to-completions
        """))
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        for _ in range(3):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        for up, context in ((a, 1000), (b, 2000)):
            assert len(up.lookups) == len(up.requests) >= 1  # asked the server it then sent to
            for sent in up.requests:
                doc = json.loads(sent.body)
                assert doc["max_tokens"] == context - mock_tokens(doc["prompt"])
        assert len(a.requests) + len(b.requests) == 3  # the dead one was skipped, no request lost


def test_sglang_reads_the_served_context_once_per_server(routes_dir, proxy_for):
    with run_mock("sglang", context=3000) as up:
        base = proxy_for(routes_dir(r=f"""
            path: /v1/chat/completions
            upstream: {up.url}/v1/completions
            adapter: chat-to-completions
            dialect: sglang
        """))
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        for _ in range(2):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        models = [r for r in up.requests if r.path == "/v1/models"]
        assert len(models) == 1 and len(up.lookups) == 2
        doc = json.loads(up.requests[-1].body)
        assert doc["max_tokens"] == 3000 - mock_tokens(doc["prompt"]) - 1


LLAMA = Path(__file__).parent / "data" / "llama-3.1-instruct" / "tokenizer_config.json"


@pytest.mark.parametrize("dialect", ["vllm", "llama.cpp", "sglang"])
def test_llama_3_1_template_reaches_each_server_with_one_bos(routes_dir, proxy_for, dialect):
    with run_mock(dialect, context=4096) as up:
        base = proxy_for(routes_dir(r=f"""
            path: /v1/chat/completions
            upstream: {up.url}/v1/completions
            adapter: chat-to-completions
            dialect: {dialect}
            template: {LLAMA}
        """))
        openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}])
        sent = json.loads(up.requests[-1].body)
        if dialect == "vllm":  # the template's BOS kept, the server's switched off, and counted the same way
            assert sent["prompt"].startswith("<|begin_of_text|><|start_header_id|>")
            assert sent["add_special_tokens"] is False
            assert json.loads(up.lookups[-1].body)["add_special_tokens"] is False
        else:  # the server adds its own: the template's is stripped
            assert sent["prompt"].startswith("<|start_header_id|>") and "add_special_tokens" not in sent
