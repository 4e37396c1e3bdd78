"""What a new operator trips on (issue 21): bad numbers on the command line, `check`'s summary."""

from __future__ import annotations

import argparse

import pytest

from proxy import cli


def _numeric_options() -> list[tuple[str, argparse.Action]]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(f"{name} {a.option_strings[-1]}", a) for name, p in sub.choices.items() for a in p._actions
            if isinstance(a.default, (int, float)) and not isinstance(a.default, bool)]


def test_every_numeric_option_has_a_range():
    options = _numeric_options()
    assert {"serve --port", "serve --workers", "serve --max-body-size", "mock-upstream --context"} <= dict(options).keys()
    assert {"serve --state-lease-ttl", "serve --responses-ttl", "serve --responses-max"} <= dict(options).keys()
    for label, action in options:
        assert getattr(action.type, "__qualname__", "").startswith("ranged."), f"{label} is not range-checked"
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [f"{name} {a.option_strings[-1]}" for name, p in sub.choices.items() for a in p._actions if a.type in (int, float)]
    assert not bare, f"numeric options without a range: {bare}"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "argument --port: must be an integer from 1 to 65535, got 99999"),
    (["serve", "--port", "0"], "argument --port: must be an integer from 1 to 65535, got 0"),
    (["serve", "--max-body-size", "-1"], "argument --max-body-size: must be an integer from 1 to 2147483647, got -1"),
    (["serve", "--workers", "0"], "argument --workers: must be an integer from 1 to 256, got 0"),
    (["serve", "--backlog", "0"], "argument --backlog: must be an integer from 1 to 2147483647, got 0"),
    (["serve", "--grace-period", "-5"], "argument --grace-period: must be a number from 0 to 86400, got -5"),
    (["serve", "--grace-period", "nan"], "argument --grace-period: must be a number from 0 to 86400, got nan"),
    (["serve", "--port", "http"], "argument --port: must be an integer from 1 to 65535, got 'http'"),
    (["serve", "--state-lease-ttl", "0"], "argument --state-lease-ttl: must be a number from 1 to 300, got 0"),
    (["serve", "--responses-ttl", "-1"], "argument --responses-ttl: must be a number from 0.001 to 100000000, got -1"),
    (["serve", "--responses-max", "0"], "argument --responses-max: must be an integer from 1 to 100000000, got 0"),
    (["mock-upstream", "--context", "0"], "argument --context: must be an integer from 1 to 100000000, got 0"),
])
def test_a_number_out_of_range_exits_2_naming_the_option_and_the_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == cli.EXIT_CONFIG
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("variable, value, message", [
    ("LLMPROXY_STATE_LEASE_TTL", "0", "argument --state-lease-ttl: must be a number from 1 to 300, got 0"),
    ("LLMPROXY_STATE_LEASE_TTL", "abc", "argument --state-lease-ttl: must be a number from 1 to 300, got 'abc'"),
    ("LLMPROXY_RESPONSES_TTL", "-1", "argument --responses-ttl: must be a number from 0.001 to 100000000, got -1"),
    ("LLMPROXY_RESPONSES_MAX", "0", "argument --responses-max: must be an integer from 1 to 100000000, got 0"),
])
def test_a_number_from_the_environment_is_range_checked_as_its_option(variable, value, message, monkeypatch, capsys):
    """The options' `LLMPROXY_*` defaults go through the same type: no traceback, no silent 0."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--routes", "/nonexistent"])
    assert exit_.value.code == cli.EXIT_CONFIG
    assert message in capsys.readouterr().err


def _check(tmp_path, capsys, **files: str) -> str:
    folder = tmp_path / "routes.d"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    assert cli.main(["check", "--routes", str(folder)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("names, family", [
    ("models: [llama, 'llama-3*']", "Llama"),
    ("upstream_model: mistralai/Mistral-7B-Instruct-v0.3", "Mistral"),
    ("models: [gemma-2-9b-it]", "Gemma"),
    ("models: [Phi-3-mini-4k-instruct]", "Phi"),
    ("models: [deepseek-coder]", "DeepSeek"),
])
def test_a_chat_route_for_another_family_on_the_default_template_is_warned_about(names, family, tmp_path, capsys):
    """README's old "add a second model" example: a Llama model silently prompted in ChatML."""
    out = _check(tmp_path, capsys, second=f"""
path: /v1/chat/completions
{names}
upstream: http://127.0.0.1:9/v1/completions
adapter: chat-to-completions
""")
    line = next(line for line in out.splitlines() if "template:" in line and line.startswith("warning:"))
    assert f"names a {family} model" in line and "'chatml'" in line and "set `template:`" in line


def test_no_family_warning_for_qwen_its_own_template_or_passthrough(tmp_path, capsys):
    (tmp_path / "llama.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    out = _check(tmp_path, capsys,
                 a="path: /a\nmodels: [qwen2.5-7b]\nupstream: http://127.0.0.1:9/v1/completions\nadapter: chat-to-completions\n",
                 b=f"path: /b\nmodels: [llama-3]\nupstream: http://127.0.0.1:9/v1/completions\nadapter: chat-to-completions\n"
                   f"template: {tmp_path / 'llama.jinja'}\n",
                 c="path: /c\nmodels: [llama-3]\nupstream: http://127.0.0.1:9/v1/completions\n")
    assert "template:" not in "\n".join(line for line in out.splitlines() if line.startswith("warning:"))


def test_serving_installs_only_the_runtime_and_the_demo_only_its_clients():
    """`just serve` / `check` install `pip install -e .`; `just demo` adds the `demo` extra, which
    holds every package proxy/demo.py imports beyond the runtime; `just test` keeps `dev`."""
    import ast
    import re
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    just = (root / "Justfile").read_text()
    recipe = lambda name: re.search(rf"^{name}\b[^:\n]*:([^\n]*)", just, re.M).group(1).split()  # noqa: E731
    assert recipe("serve")[0] == recipe("check")[0] == "install-runtime"
    assert recipe("demo")[0] == "install-demo" and recipe("test")[0] == "install"
    assert '(_venv "." ' in just and '(_venv ".[demo]" ' in just and '(_venv ".[dev]" ' in just
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[\[<>=~! ]", req, maxsplit=1)[0].lower()  # noqa: E731
    runtime = {name(r) for r in project["dependencies"]}
    demo = {name(r) for r in project["optional-dependencies"]["demo"]}
    assert demo <= {name(r) for r in project["optional-dependencies"]["dev"]}
    tree = ast.parse((root / "proxy" / "demo.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    third_party = imported - set(sys.stdlib_module_names) - {"proxy"}
    assert third_party <= runtime | demo, third_party - runtime - demo


def test_checks_path_count_names_the_paths_the_table_does_not_show(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("QWEN_BASE_URL", "http://127.0.0.1:9")
    assert cli.main(["check", "--routes", str(Path(__file__).resolve().parent.parent / "routes.d")]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("4 route(s) OK on 6 path(s) (2 answered beside their route: "
                              "/v1/messages/count_tokens, /v1/responses/input_tokens)"), summary


def test_the_shipped_template_comment_lists_every_built_in_template():
    from pathlib import Path

    from proxy.adapters.templates import BUILTIN

    text = (Path(__file__).resolve().parent.parent / "routes.d" / "chat-completions.yaml").read_text()
    (comment,) = [line.split("#", 1)[1] for line in text.splitlines() if line.startswith("template:")]
    assert all(name in comment for name in BUILTIN), comment


def test_ready_needs_upstreams_reaches_the_workers(tmp_path, monkeypatch, request):
    """`serve --ready-needs-upstreams` travels to each worker as a WorkerSettings field."""
    from proxy.app import app_from_env
    from proxy.settings import WorkerSettings

    (tmp_path / "r.yaml").write_text("path: /v1/completions\nupstream: http://127.0.0.1:9/v1/completions\n")
    # app_from_env is a worker's start: it tunes the process (log record fields, the collector) for
    # serving. Undone here, so the tests after this one run in the process they started in.
    import gc
    import logging

    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    threshold = gc.get_threshold()
    request.addfinalizer(lambda: (gc.set_threshold(*threshold), gc.unfreeze()))
    env: dict[str, str] = {}
    WorkerSettings(routes=str(tmp_path), ready_needs_upstreams=True).export(env)
    assert env["LLMPROXY_READY_NEEDS_UPSTREAMS"] == "1"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert app_from_env().state.ready_needs_upstreams is True
    monkeypatch.delenv("LLMPROXY_READY_NEEDS_UPSTREAMS")
    assert app_from_env().state.ready_needs_upstreams is False
    assert cli._parser().parse_args(["serve", "--ready-needs-upstreams"]).ready_needs_upstreams is True
