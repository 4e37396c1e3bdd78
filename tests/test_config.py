"""Route files: each kind of mistake is reported as `FILE[:LINE]: field: reason`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import expand_env, load_dir, load_file
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOOD = "path: /v1/x\nupstream: http://127.0.0.1:9/v1/x\n"


def write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, expected",
    [
        ("path: /v1/x\nupstream: [unclosed\n", r"r\.yaml:3: yaml: .*"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\nbogus: 1\n", r"r\.yaml:3: bogus: unknown field"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\ntimeout: {read: soon}\n", r"r\.yaml:3: timeout\.read: Expected `float`, got `str`"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\ntimeout: {reed: 3}\n", r"r\.yaml:3: timeout\.reed: unknown field"),
        ("upstream: http://127.0.0.1:9/\n", r"r\.yaml: path: required field is missing"),
        ("path: v1/x\nupstream: http://127.0.0.1:9/\n", r"r\.yaml:1: path: must be an absolute URL path"),
        ("path: /v1/x\nupstream: ftp://127.0.0.1/\n", r"r\.yaml:2: upstream: must be an http\(s\) URL with a host"),
        ("path: /v1/x\nupstream: http://127.0.0.1:99999/\n", r"r\.yaml:2: upstream: bad URL"),
        ("path: /v1/x\nupstream: http://u:pw@127.0.0.1:9/\n", r"r\.yaml:2: upstream: must not carry user:password@"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\nmethods: [FETCH]\n", r"r\.yaml:3: methods: unknown HTTP method 'FETCH'"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\nadapter: magic\n", r"r\.yaml:3: adapter: Invalid enum value 'magic'"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\nstream: sometimes\n", r"r\.yaml:3: stream: Invalid enum value"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\nhosted_tools: drop\n", r"r\.yaml:3: hosted_tools: Invalid enum value 'drop'"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\ndefault_headers: {'Bad Name': x}\n", r"r\.yaml:3: default_headers\.Bad Name: not a valid header name"),
        ("path: /v1/x\nupstream: ${LLMPROXY_TEST_UNSET}/v1\n", r"r\.yaml:2: upstream: environment variable LLMPROXY_TEST_UNSET is not set"),
        ("path: /healthz\nupstream: http://127.0.0.1:9/\n", r"r\.yaml:1: path: /healthz is one of the proxy's own endpoints"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\ntemplate: nope.jinja\n", r"r\.yaml:3: template: neither 'chatml' nor 'qwen2\.5' nor 'qwen3' nor an existing file: .*nope\.jinja"),
        ("path: /v1/x\nupstream: http://127.0.0.1:9/\ntimeout: {read: 0}\n", r"r\.yaml:3: timeout\.read: must be a positive number"),
        ("- just\n- a list\n", r"r\.yaml: file: expected a mapping"),
    ],
)
def test_bad_file_says_where_and_why(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, "r.yaml", text))
    assert re.search(expected, str(info.value)), str(info.value)
    assert str(info.value).startswith(str(tmp_path / "r.yaml"))


def test_duplicate_names_are_refused(tmp_path):
    write(tmp_path, "a.yaml", "name: same\n" + GOOD)
    write(tmp_path, "b.yaml", "name: same\npath: /v1/y\nupstream: http://127.0.0.1:9/\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: name: 'same' is already used by .*a\.yaml"):
        load_dir(tmp_path)


def test_two_fallbacks_on_one_path_are_refused(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    with pytest.raises(ConfigError, match=r"b\.yaml: path: POST /v1/x already has a route without `models`"):
        load_dir(tmp_path)


def test_files_load_in_name_order_and_name_defaults_to_stem(tmp_path):
    write(tmp_path, "20-b.yaml", "path: /b\nupstream: http://127.0.0.1:9/\n")
    write(tmp_path, "10-a.yml", "path: /a\nupstream: http://127.0.0.1:9/\n")
    write(tmp_path, "notes.txt", "ignored")
    assert [r.name for r in load_dir(tmp_path)] == ["10-a", "20-b"]


def test_defaults_fill_every_optional_field(tmp_path):
    r = load_file(write(tmp_path, "r.yaml", GOOD))
    assert (r.methods, r.adapter, r.stream, r.models, r.default_headers) == (("POST",), "passthrough", "auto", (), {})
    assert (r.timeout.connect, r.timeout.read) == (5.0, 600.0)


def test_env_expansion():
    env = {"A": "1", "EMPTY": ""}
    assert expand_env("${A}/${B:-two}/${EMPTY:-d}/${EMPTY}", env) == "1/two/d/"
    with pytest.raises(KeyError):
        expand_env("${MISSING}", env)
    assert expand_env("no vars here $A {A}", env) == "no vars here $A {A}"


def test_blank_secret_still_serves(tmp_path, monkeypatch):
    """`Bearer ${QWEN_API_KEY:-}` with no key must not produce a value h11 rejects, nor a
    credential-less `Authorization: Bearer` upstream: the header is left out."""
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    r = load_file(write(tmp_path, "r.yaml", GOOD + "default_headers: {Authorization: 'Bearer ${QWEN_API_KEY:-}'}\n"))
    assert r.default_headers == {}


def test_the_alternative_form_expands_only_when_the_variable_has_a_value():
    """POSIX `${VAR:+word}`: word (itself expanded) when VAR is set and non-empty, else nothing."""
    env = {"K": "abc", "EMPTY": ""}
    assert expand_env("${K:+Bearer ${K}}", env) == "Bearer abc"
    assert expand_env("${UNSET:+Bearer ${UNSET}}", env) == ""  # the word is not expanded: no error
    assert expand_env("${EMPTY:+x}", env) == ""
    assert expand_env("a${K:+[${UNSET:-d}]}b", env) == "a[d]b"
    assert expand_env("${K:-${EMPTY:-deep}}|${EMPTY:-${K}}", env) == "abc|abc"


@pytest.mark.parametrize("value, sent", [
    ("${QWEN_API_KEY:+Bearer ${QWEN_API_KEY}}", None),
    ("Bearer ${QWEN_API_KEY:-}", None),
    ("${QWEN_API_KEY:-}", None),
])
def test_a_default_header_that_expands_to_nothing_is_not_sent(value, sent, tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    r = load_file(write(tmp_path, "r.yaml", GOOD + f"default_headers: {{Authorization: '{value}', X-Keep: kept}}\n"))
    assert r.default_headers == {"X-Keep": "kept"}
    monkeypatch.setenv("QWEN_API_KEY", "sk-upstream")
    r = load_file(write(tmp_path, "r.yaml", GOOD + f"default_headers: {{Authorization: '{value}', X-Keep: kept}}\n"))
    assert r.default_headers["Authorization"].endswith("sk-upstream")


def test_the_shipped_routes_send_no_authorization_without_a_key(upstream, tmp_path, monkeypatch):
    """With QWEN_API_KEY unset the upstream gets no `Authorization: Bearer ` (issue 21, item 7)."""
    import httpx

    from proxy.app import create_app
    from proxy.routes import RouteTable
    from servers import run_app

    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    monkeypatch.setenv("QWEN_BASE_URL", upstream.url)
    table = RouteTable.from_dir(ROOT / "routes.d")
    assert all("Authorization" not in r.config.default_headers for r in table.routes)
    with run_app(create_app(table)) as base:
        assert httpx.post(f"{base}/v1/completions", json={"model": "qwen", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert "authorization" not in {k.lower() for k in upstream.requests[-1].headers}
    monkeypatch.setenv("QWEN_API_KEY", "sk-upstream")
    table = RouteTable.from_dir(ROOT / "routes.d")
    assert {r.config.default_headers["Authorization"] for r in table.routes} == {"Bearer sk-upstream"}


def test_shipped_routes_follow_qwen_base_url(monkeypatch):
    monkeypatch.setenv("QWEN_BASE_URL", "http://127.0.0.1:8019")
    routes = load_dir(ROOT / "routes.d")
    chat = next(r for r in routes if r.path == "/v1/chat/completions")
    assert chat.upstreams == ("http://127.0.0.1:8019/v1/completions",)
    monkeypatch.delenv("QWEN_BASE_URL")
    chat = next(r for r in load_dir(ROOT / "routes.d") if r.path == "/v1/chat/completions")
    assert chat.upstreams == ("http://10.103.232.66:8019/v1/completions",)  # parsed only: no traffic


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "QWEN_BASE_URL": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_check_prints_the_table_of_the_shipped_folder():
    out = run_cli("check", "--routes", "routes.d")
    assert out.returncode == 0, out.stderr
    assert "/v1/chat/completions" in out.stdout and "route(s) OK" in out.stdout


def test_check_exits_2_with_the_reason(tmp_path):
    write(tmp_path, "bad.yaml", "path: /v1/x\nupstream: http://127.0.0.1:9/\nbogus: 1\n")
    out = run_cli("check", "--routes", str(tmp_path))
    assert out.returncode == 2
    assert "bad.yaml:3: bogus: unknown field" in out.stderr


def test_serve_refuses_a_bad_folder_before_listening(tmp_path):
    write(tmp_path, "bad.yaml", "path: [\n")
    out = run_cli("serve", "--routes", str(tmp_path), "--port", "9")
    assert out.returncode == 2 and "bad.yaml:" in out.stderr
