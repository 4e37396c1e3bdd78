"""Fixtures: a mock upstream and the proxy, both real servers on loopback."""

from __future__ import annotations

import io
import json
import logging
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import observe
from proxy.app import create_app
from proxy.keys import KeysHolder
from proxy.routes import RouteTable
from servers import MockServer, run_app, run_mock

# Belt and braces beside pytest-socket: nothing in the suite may use the shipped default upstream.
os.environ["QWEN_BASE_URL"] = "http://127.0.0.1:9"
os.environ.pop("QWEN_API_KEY", None)


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    with run_mock() as server:
        yield server


@pytest.fixture
def routes_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write route files: `routes_dir(a="yaml text", b=...)` -> the folder (files a.yaml, b.yaml)."""
    folder = tmp_path / "routes.d"
    folder.mkdir()

    def write(**files: str) -> Path:
        for name, text in files.items():
            (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
        return folder

    return write


@pytest.fixture
def completions_route(routes_dir: Callable[..., Path], upstream: MockServer) -> Path:
    """A routes folder with one passthrough route `r`: POST /v1/completions to the mock upstream."""
    return routes_dir(r=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
    """)


@pytest.fixture
def keys_for(tmp_path: Path) -> Callable[..., KeysHolder]:
    """`keys_for(name="key", ...)` -> a `KeysHolder` over a keys file with those entries."""

    def make(**keys: str) -> KeysHolder:
        path = tmp_path / "keys.yaml"
        path.write_text("keys:\n" + "".join(f"  - name: {n}\n    key: {k}\n" for n, k in keys.items()))
        return KeysHolder.load(path)

    return make


@pytest.fixture
def proxy_for() -> Iterator[Callable[..., str]]:
    """Start the proxy over a routes folder; returns its base URL."""
    from contextlib import ExitStack

    with ExitStack() as stack:

        def start(folder: Path, **kw: object) -> str:
            app = create_app(RouteTable.from_dir(folder), **kw)  # type: ignore[arg-type]
            return stack.enter_context(run_app(app))

        yield start


@pytest.fixture
def access_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Capture the access log as the JSON formatter writes it; returns a reader of parsed lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(observe.JsonFormatter())
    log = observe.access_log
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def read() -> list[dict[str, Any]]:
        text = stream.getvalue()
        assert text.endswith("\n") or not text
        return [json.loads(line) for line in text.splitlines()]  # every line is one JSON object

    read.raw = stream.getvalue  # type: ignore[attr-defined]
    try:
        yield read
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
