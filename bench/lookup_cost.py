"""Added latency of `max_tokens: auto` (one POST /tokenize to the same upstream) on loopback, in one process.

Run from the repository root: `.venv/bin/python bench/lookup_cost.py`. Requests with and without a
client limit alternate, so drift on a shared machine hits both alike; the numbers are relative only
(mock, proxy and client share one process and its GIL)."""

import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, "tests")
sys.path.insert(0, ".")
import httpx  # noqa: E402

from proxy.app import create_app  # noqa: E402
from proxy.routes import RouteTable  # noqa: E402
from servers import run_app, run_mock  # noqa: E402

N = 1000
MESSAGES = [{"role": "user", "content": "Hi there"}]

with run_mock("vllm") as up, tempfile.TemporaryDirectory() as d:
    folder = pathlib.Path(d)
    (folder / "r.yaml").write_text(f"path: /v1/chat/completions\nupstream: {up.url}/v1/completions\n"
                                   "adapter: chat-to-completions\n")
    up.mock.record = False
    with run_app(create_app(RouteTable.from_dir(folder))) as base, httpx.Client() as c:
        url = f"{base}/v1/chat/completions"
        limited = {"model": "m", "messages": MESSAGES, "max_tokens": 64}
        auto = {"model": "m", "messages": MESSAGES}
        times: dict[str, list[float]] = {"limit": [], "auto": []}
        for i in range(N + 100):
            for name, body in (("limit", limited), ("auto", auto)):
                t = time.perf_counter()
                c.post(url, json=body).raise_for_status()
                if i >= 100:  # warm-up
                    times[name].append(time.perf_counter() - t)
        lim, aut = (statistics.median(times[k]) * 1000 for k in ("limit", "auto"))
        print(f"p50 ms over {N} alternating pairs: client max_tokens {lim:.3f} | no limit (auto lookup) {aut:.3f}"
              f" | added {aut - lim:+.3f}")
