"""`bench/run.py --profile`: py-spy samples the proxy process under load; top functions by own and total time.

Sampling perturbs the process, so profile runs report where the time goes,
never CPU per request: take those figures from a plain run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import loadclient
import procs
import wrkload
from common import PATHS, ROOT, body_for, headers_for

RATE = 250  # samples/s
TOP = 25
# py-spy "raw" (collapsed) frames look like "send (httpx/_client.py:1629)": drop the line to group by function.
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_SITE = re.compile(r".*/(?:site|dist)-packages/")
# Start-up frames under every loop iteration: they say nothing in an inclusive ranking.
_BOOT = ("(<frozen runpy>)", "(proxy/__main__.py)", "(proxy/cli.py)", "(uvicorn/main.py)", "(uvicorn/_compat.py)",
         "Server.run (uvicorn/server.py)", "Server.serve (uvicorn/server.py)", "Server._serve (uvicorn/server.py)")


def _frame(raw: str) -> tuple[str, str]:
    m = _FRAME.match(raw)
    if not m:
        return raw, "?"
    file = _SITE.sub("", m["file"])
    file = re.sub(r".*/lib/python3\.\d+/", "stdlib/", file)
    file = re.sub(r".*/(proxy/)", r"\1", file)
    return f"{m['fn']} ({file})", _package(file)


def _package(file: str) -> str:
    if file.startswith("stdlib/"):
        return "stdlib:" + file.split("/")[1].removesuffix(".py")
    return file.split("/")[0].removesuffix(".py") or "?"


def summarize(collapsed: str) -> dict[str, Any]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += n
        own[frames[-1][0]] += n
        by_package[frames[-1][1]] += n
        for name in {f for f, _ in frames if not f.endswith(_BOOT)}:
            total[name] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, 100 * v / samples) for name, v in c.most_common(k)] if samples else []

    return {"samples": samples, "own": pct(own, TOP), "total": pct(total, TOP), "packages": pct(by_package, 15)}


def render(name: str, s: dict[str, Any]) -> str:
    out = [f"== {name}: {s['samples']} samples"]
    out.append("  own time by package: " + ", ".join(f"{p} {v:.1f}%" for p, v in s["packages"]))
    out.append("  top own (self) time (Runner.run own = the event loop's C code: uvloop, sockets, callbacks):")
    out += [f"    {v:5.1f}%  {f}" for f, v in s["own"]]
    out.append("  top total (inclusive) time:")
    out += [f"    {v:5.1f}%  {f}" for f, v in s["total"]]
    return "\n".join(out)


def record(pid: int, seconds: float, out: Path, native: bool) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(RATE),
            "--format", "raw", "--output", str(out)]
    # --nonblocking perturbs the proxy least, but py-spy needs to stop it to unwind C frames.
    argv.append("--native" if native else "--nonblocking")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(args: argparse.Namespace, src: Path) -> int:
    outdir = ROOT / "bench/results/profile"
    outdir.mkdir(parents=True, exist_ok=True)
    vias = [v for v in args.via.split(",") if v and v not in ("direct", "pipe")]
    if args.scale:
        return scale_profile(args, src, vias, outdir)
    text: list[str] = []
    with procs.start(src, chat="chat" in vias) as stack:
        live = [v for v in vias if v != "chat" or stack.chat_missing is None]
        # Warm up both paths first: the profile is about the steady state.
        for via in live:
            for stream in (False, True):
                req = loadclient.build_request(stack.proxy_port, PATHS[via], body_for(via, stream), headers_for(stream))
                loadclient.run(loadclient.load(stack.proxy_port, req, 8, 1.0, count=500))
        for via in live:
            for stream in (False, True):
                name = f"{via}-{'stream' if stream else 'nonstream'}-c32"
                raw = outdir / f"{name}.txt"
                spy = record(stack.proxy.pid, args.seconds, raw, native=args.native)
                threading.Event().wait(0.3)  # py-spy attached before the load starts
                path, body, hdrs = PATHS[via], body_for(via, stream), headers_for(stream)
                if stream or not wrkload.available():
                    req = loadclient.build_request(stack.proxy_port, path, body, hdrs)
                    loadclient.run(loadclient.load(stack.proxy_port, req, 32, args.seconds))
                else:
                    wrkload.load(stack.proxy_port, path, body, hdrs, 32, args.seconds)
                _, err = spy.communicate(timeout=args.seconds + 30)
                if spy.returncode != 0 or not raw.exists():
                    print(f"py-spy failed on {name}: {err.decode(errors='replace').strip()}", file=sys.stderr)
                    return 1
                text.append(render(name, summarize(raw.read_text())))
                print(text[-1], flush=True)
        if stack.chat_missing and "chat" in vias:
            text.append(f"chat: n/a (chat adapter missing): {stack.chat_missing}")
    (outdir / "summary.txt").write_text("\n\n".join(text) + "\n")
    print(f"written: {outdir}/ (collapsed stacks: feed them to flamegraph.pl or speedscope)")
    return 0



def scale_profile(args: argparse.Namespace, src: Path, vias: list[str], outdir: Path) -> int:
    """`--profile --scale`: py-spy on the proxy while the first `--streams` N slow streams are open."""
    import scale

    n = int(args.streams.split(",")[0])
    text: list[str] = []
    serve_args = tuple(args.serve_args.split()) if args.serve_args else ()
    with procs.start(src, python=args.python, chat="chat" in vias, serve_args=serve_args) as stack:
        for via in [v for v in vias if v != "chat" or stack.chat_missing is None]:
            name = f"{via}-scale-{n}"
            raw = outdir / f"{name}.txt"
            # Record the middle of the 10 s streams: all open, past the connect burst.
            start, length = (scale.STEADY[0] + 0.5, scale.STEADY[1] - scale.STEADY[0]) if not args.ramp else (0.4, 2.0)
            name += "-ramp" if args.ramp else ""
            raw = outdir / f"{name}.txt"
            timer = threading.Timer(start, lambda: box.append(record(stack.proxy.pid, length, raw, native=args.native)))
            box: list[subprocess.Popen[bytes]] = []
            timer.start()
            row = scale.scenario(stack, via, n, args.clients, args.python)
            timer.join()
            _, err = box[0].communicate(timeout=60)
            if box[0].returncode != 0 or not raw.exists():
                print(f"py-spy failed on {name}: {err.decode(errors='replace').strip()}", file=sys.stderr)
                return 1
            text.append(render(name, summarize(raw.read_text())) +
                        f"\n  (unprofiled figures are not valid here; completed {row['completed']}/{n})")
            print(text[-1], flush=True)
            threading.Event().wait(scale.SETTLE_S)
    (outdir / "summary-scale.txt").write_text("\n\n".join(text) + "\n")
    print(f"written: {outdir}/")
    return 0
