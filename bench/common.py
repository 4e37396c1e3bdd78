"""What the benchmark scripts share (run.py, scale.py, profiling.py): the requests they send and
the report's head. One module they all import, so none imports another for a helper."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import wrkload

ROOT = Path(__file__).resolve().parent.parent
TEXT = " ".join(f"w{i}" for i in range(64))  # 64 words: a 64-event stream, ~300-byte answers
EVENTS = 64
PROMPT = "Say hello to the benchmark."
COMPLETION = {"model": "qwen", "prompt": PROMPT, "max_tokens": 64}
CHAT = {"model": "qwen", "messages": [{"role": "system", "content": "You are terse."},
                                      {"role": "user", "content": PROMPT}], "max_tokens": 64}
VIAS = ("direct", "passthrough", "chat")
PATHS = {"direct": "/v1/completions", "passthrough": "/v1/completions", "chat": "/v1/chat/completions"}
PACKAGES = ("litestar", "uvicorn", "aiohttp", "msgspec", "uvloop", "httptools", "anyio")


def body_for(via: str, stream: bool) -> bytes:
    doc = dict(CHAT if via == "chat" else COMPLETION)
    if stream:
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


def headers_for(stream: bool, events: int = EVENTS, text: str = TEXT, interval_ms: int = 0) -> dict[str, str]:
    h = {"x-mock-text": text}
    if stream:
        h["x-mock-events"] = str(events)
        if interval_ms:
            h["x-mock-interval-ms"] = str(interval_ms)
    return h


def meta(args: argparse.Namespace, src: Path, use_wrk: bool) -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True, timeout=5).stdout.strip()
        except OSError:
            return ""

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    commit = git("rev-parse", "--short", "HEAD")
    return {
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "src": str(src),
        "commit": (commit + ("-dirty" if git("status", "--porcelain", "--", "proxy") else "")) if commit else "-",
        "seconds_per_scenario": args.seconds,
        "load_tools": {"non-stream": wrkload.version() if use_wrk else "asyncio client",
                       "stream": "asyncio client (httptools, uvloop)"},
        "python": subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, timeout=10).stdout.strip(),
        "versions": {p: version(p) for p in PACKAGES},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem, "kernel": platform.release(),
                    "loadavg_at_start": os.getloadavg()[0]},
    }


def title(m: dict[str, Any], what: str) -> str:
    """The first line of a report: what ran, when, on which commit."""
    return f"llmproxy {what}  {m['date']}  commit {m['commit']}" + (f"  [{m['label']}]" if m["label"] else "")


def columns(head: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...]) -> list[str]:
    """Rows as aligned text: the `left` columns flush left, the others (figures) flush right."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in [head, *rows]]


def preamble(m: dict[str, Any], what: str, command_note: str = "") -> list[str]:
    """The report's first lines: what ran, when and where, with which versions."""
    return [
        title(m, what),
        f"command: {m['command']}{command_note}",
        f"machine: {m['machine']['cpu']}, {m['machine']['cores']} cores, {m['machine']['mem_mib']} MiB, "
        f"Linux {m['machine']['kernel']}, load avg {m['machine']['loadavg_at_start']:.2f} at start",
        f"python {m['python']}  " + "  ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
