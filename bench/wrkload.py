"""Non-streaming load with wrk (Debian's `wrk`): C, epoll, a fraction of the CPU of any Python client."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from loadclient import Result
from procs import HOST

LUA = Path(__file__).with_name("post.lua")


def available() -> bool:
    return shutil.which("wrk") is not None


def version() -> str:
    try:
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
    except OSError:
        return "missing"
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" [")[0] if first else "unknown"


def load(port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> Result:
    """One wrk run on one thread (the machine has two cores, shared with the servers)."""
    with tempfile.NamedTemporaryFile(prefix="bench-body-", suffix=".json") as f:
        f.write(body)
        f.flush()
        argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                "-s", str(LUA), f"http://{HOST}:{port}{path}", "--", f.name]
        argv += [f"{k}: {v}" for k, v in headers.items()]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    s = json.loads(line.removeprefix("WRKJSON "))
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    return Result(requests=s["requests"], errors=errors, seconds=s["duration_us"] / 1e6,
                  quantiles={"latency_p50": s["p50_us"] / 1e6, "latency_p99": s["p99_us"] / 1e6})
