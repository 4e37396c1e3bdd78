"""What a newcomer trips on: each message says what to write instead, no traceback, no silent default.

Nothing here sends a request to the shipped default upstream: the warnings about it are read
from `llmproxy check` and from the start-up log, with no request sent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest

from proxy.cli import main as cli
from proxy.config import load_dir, load_file
from proxy.errors import ConfigError
from proxy.routes import RouteTable
from servers import free_port, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SEED = "http://10.103.232.66:8019"  # the shipped default upstream: read from files, never contacted
DEAD_DEFAULT = "http://127.0.0.1:9"  # what the subprocess test serves instead (discard port: refused)
LLMPROXY = [sys.executable, "-m", "proxy"]


def write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.write_text(text)
    return p


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_file(path)
    return str(info.value)


BASE = "path: /v1/x\nupstream: http://127.0.0.1:9/v1/x\n"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("adapter: magic\n", "adapter: Invalid enum value 'magic'; valid values: 'passthrough', 'chat-to-completions'"),
        ("stream: sometimes\n", "stream: Invalid enum value 'sometimes'; valid values: 'auto', 'always', 'never'"),
        ("reasoning: deep\n", "reasoning: Invalid enum value 'deep'; valid values: 'none', 'think'"),
        # YAML 1.1 reads `yes` as true: say so, and what to write.
        ("stream: yes\n", "stream: got true (YAML reads unquoted yes/no/on/off/true/false as booleans): quote the "
                          "word or use one of 'auto', 'always', 'never'; write stream: always"),
        ("stream: off\n", "write stream: never"),
    ],
)
def test_enum_errors_list_the_valid_values(tmp_path, extra, expected):
    assert expected in error_of(write(tmp_path, "r.yaml", BASE + extra))


def test_enum_values_come_from_the_type_so_new_enums_get_them_too():
    """A key added later as a `Literal` (e.g. `dialect`) is listed without touching the message code."""
    from proxy import config

    class Grown(config.RouteConfig, frozen=True, kw_only=True):
        dialect: Literal["vllm", "llama.cpp", "sglang", "openai"] = "openai"

    assert config._literal_values("dialect", Grown) == ("vllm", "llama.cpp", "sglang", "openai")
    assert config._literal_values("adapter", Grown) == (
        "passthrough", "chat-to-completions", "messages-to-completions", "responses-to-completions")
    assert config._literal_values("timeout.read", Grown) == ()


@pytest.mark.parametrize(
    "headers, expected",
    [
        ("{X-Org: 42}", 'default_headers.X-Org: must be a string, got the number 42; quote it: `X-Org: "42"`'),
        ("{X-Flag: yes}", "default_headers.X-Flag: must be a string, got True (YAML reads unquoted"),
        ("{Authorization: }", 'default_headers.Authorization: has no value; write `Authorization: ""`'),
        ("{X-List: [a, b]}", "default_headers.X-List: must be a string, got a list"),
    ],
)
def test_non_string_header_values_name_the_header_and_the_fix(tmp_path, headers, expected):
    message = error_of(write(tmp_path, "r.yaml", BASE + f"default_headers: {headers}\n"))
    assert f"r.yaml:3: {expected}" in message, message


def test_an_empty_file_says_what_a_route_needs(tmp_path):
    message = error_of(write(tmp_path, "r.yaml", "# nothing yet\n"))
    assert message.endswith("r.yaml: file: is empty; a route file needs at least `path:` and `upstream:` "
                            "(see README, Route files)")


def test_missing_and_empty_routes_folders_say_so(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"routes folder: does not exist; pass --routes DIR or set LLMPROXY_ROUTES"):
        load_dir(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("not a route")
    assert cli(["check", "--routes", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: routes folder: no routes (no *.yaml or *.yml file); add one with at least `path:` and " in err
    assert load_dir(empty, allow_empty=True) == []  # a reload may empty the folder on purpose


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://127.0.0.1:9/v1/x y", "contains a space"),
        ("http://127.0.0.1:9/v1/<x>", "contains the character '<'"),
        ("http://127.0.0.1:9/v1/%zz", "contains the character '%'"),
        ("http://exa mple:9/v1/x", "contains a space"),
    ],
)
def test_urls_a_url_cannot_carry_are_refused(tmp_path, url, shown):
    message = error_of(write(tmp_path, "r.yaml", f"path: /v1/x\nupstream: '{url}'\n"))
    assert "r.yaml:2: upstream: bad URL" in message and shown in message, message


@pytest.mark.parametrize(
    "base, used",
    [
        ("http://h:8000/v1/", "http://h:8000/v1/completions"),
        ("http://h:8000/v1", "http://h:8000/v1/completions"),
        ("http://h:8000/", "http://h:8000/v1/completions"),
        ("http://h:8000", "http://h:8000/v1/completions"),
        ("http://h:8000/prefix/v1/", "http://h:8000/prefix/v1/completions"),
    ],
)
def test_a_base_url_with_v1_or_a_slash_is_not_doubled(tmp_path, monkeypatch, base, used):
    monkeypatch.setenv("LLMPROXY_TEST_BASE", base)
    route = load_file(write(tmp_path, "r.yaml", "path: /v1/x\nupstream: ${LLMPROXY_TEST_BASE}/v1/completions\n"))
    assert route.upstream == used


def test_check_warns_when_the_shipped_routes_run_on_their_default_address(capsys, monkeypatch):
    """No request is sent: `check` without --probe never touches the network."""
    monkeypatch.delenv("QWEN_BASE_URL", raising=False)
    assert cli(["check", "--routes", str(ROOT / "routes.d")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: .*chat-completions\.yaml: upstream: QWEN_BASE_URL is not set \(or empty\), so route "
                     r"'qwen-chat' sends to the default in the file: http://10\.103\.232\.66:8019/v1/completions; "
                     r"set QWEN_BASE_URL", out), out
    monkeypatch.setenv("QWEN_BASE_URL", "http://127.0.0.1:9")
    assert cli(["check", "--routes", str(ROOT / "routes.d")]) == 0
    assert "QWEN_BASE_URL is not set" not in capsys.readouterr().out


def test_options_a_passthrough_route_ignores_are_warned_about(tmp_path):
    write(tmp_path, "a.yaml", BASE + "template: qwen2.5\nreasoning: think\n")
    warnings = RouteTable.from_dir(tmp_path).warnings()
    assert any("a.yaml: template: has no effect on a passthrough route" in w for w in warnings), warnings
    assert any("a.yaml: reasoning: has no effect on a passthrough route" in w for w in warnings), warnings
    write(tmp_path, "a.yaml", BASE + "adapter: chat-to-completions\ntemplate: qwen2.5\n")
    assert RouteTable.from_dir(tmp_path).warnings() == []


def test_a_catch_all_glob_that_hides_the_fallback_is_warned_about(tmp_path):
    write(tmp_path, "a.yaml", "name: all\nmodels: ['*']\n" + BASE)
    write(tmp_path, "b.yaml", "name: rest\n" + BASE)
    (warning,) = RouteTable.from_dir(tmp_path).warnings()
    assert "models: '*' of route 'all' matches every model, so the fallback route 'rest'" in warning
    assert "is never used" in warning


def test_version():
    out = subprocess.run([*LLMPROXY, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and re.fullmatch(r"llmproxy \d+\.\d+\.\d+\S*\n", out.stdout), out


def test_check_into_a_closed_pipe_ends_quietly(tmp_path):
    """`llmproxy check | head -1` on a table larger than a pipe buffer."""
    ups = ", ".join(f"http://127.0.0.1:{10000 + i}/v1/completions" for i in range(2000))
    write(tmp_path, "big.yaml", f"path: /v1/x\nupstream: [{ups}]\n")
    cmd = " ".join([*LLMPROXY, "check", "--routes", str(tmp_path)]) + " | head -1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.startswith("PATH") and out.stdout.count("\n") == 1
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode == 0


# --- serve: start-up log, exit codes, shutdown -----------------------------------------------


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_start_up_logs_the_table_once_and_warns_about_the_default_upstream(tmp_path, monkeypatch):
    """The shipped routes with QWEN_BASE_URL unset, two workers: the table and the warning are
    logged once (by the main process), and no request is sent anywhere."""
    folder = tmp_path / "routes.d"
    shutil.copytree(ROOT / "routes.d", folder)
    # A real `serve` runs outside pytest-socket's fence: the shipped files' default address is
    # swapped for a dead loopback port, so nothing this process might ever send can leave the
    # machine (the warning is about the variable being unset, whatever the default says).
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace(SEED, DEAD_DEFAULT))
    # Fail closed: if the shipped default ever changes, the swap above misses it and this stops the
    # test before `serve` starts, instead of letting it reach another machine.
    monkeypatch.delenv("QWEN_BASE_URL")
    hosts = {urlsplit(u).hostname for r in load_dir(folder) for u in r.upstreams}
    assert hosts == {"127.0.0.1"}, f"a copied route would leave loopback: {hosts}"
    port = free_port()
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN_BASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
    with err.open("wb") as stderr:
        proc = subprocess.Popen([*LLMPROXY, "serve", "--routes", str(folder), "--port", str(port), "--workers", "2"],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)  # fmt: skip
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", err)
    finally:
        assert stop(proc) == 0
    logs = _lines(err.read_text())
    table = [line["message"] for line in logs if line["message"].startswith("route table: ")]
    assert table[0].split()[2:8] == ["PATH", "METHODS", "MODELS", "ADAPTER", "STREAM", "UPSTREAM"]
    assert sum("qwen-chat" in line for line in table) == 1  # once, not once per worker
    assert any(f"{DEAD_DEFAULT}/v1/completions" in line for line in table)
    assert not any(SEED in line for line in table)
    loud = [line for line in logs if line["level"] == "warning" and "QWEN_BASE_URL is not set" in line["message"]]
    shipped = [f for f in (ROOT / "routes.d").glob("*.yaml") if "QWEN_BASE_URL" in f.read_text()]
    assert len(loud) == len(shipped) >= 2  # one per shipped route on the default, once
    assert "Traceback" not in err.read_text()


def test_a_port_in_use_exits_3(tmp_path):
    import socket

    folder = tmp_path / "routes.d"
    folder.mkdir()
    write(folder, "a.yaml", BASE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            out = subprocess.run([*LLMPROXY, "serve", "--routes", str(folder), "--port", str(port),
                                  "--workers", workers], capture_output=True, text=True, timeout=60)  # fmt: skip
            assert out.returncode == 3, (workers, out.stderr)
            assert "address already in use" in out.stderr.lower()
