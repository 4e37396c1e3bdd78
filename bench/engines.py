"""What an `engine:` route costs a request while its engine runs: `Engines.get`, `admit`,
`leave` (README "Several models on one GPU"). CPU only, no process is started.

    .venv/bin/python bench/engines.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from proxy.engines import RUNNING, Engines
from proxy.routes import RouteTable


def route(idle_ttl: float):
    folder = Path(tempfile.mkdtemp())
    (folder / "a.yaml").write_text(
        "path: /v1/completions\nupstream: http://127.0.0.1:${PORT}/v1/completions\n"
        f"engine:\n  command: [{sys.executable}, -m, http.server, '${{PORT}}']\n  idle_ttl: {idle_ttl}\n"
    )
    return RouteTable.from_dir(folder).routes[0]


async def main(n: int = 200_000) -> None:
    for idle_ttl in (0, 600):
        r = route(idle_ttl)
        engines = Engines()
        engine = engines.get(r)
        engine.state, engine.port = RUNNING, 1  # as if started: the hot path only
        started = time.perf_counter()
        for _ in range(n):
            e = engines.get(r)
            e.admit()
            e.leave()
        per = (time.perf_counter() - started) / n * 1e6
        print(f"idle_ttl {idle_ttl:>3}: {per:.2f} us per request (get + admit + leave)")


if __name__ == "__main__":
    asyncio.run(main())
