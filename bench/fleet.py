"""`just bench --fleet`: round-robin, least-busy and prefix over a simulated fleet of engines.

K fake engines (aiohttp servers on loopback, in this process) model what
matters for routing, after vLLM's scheduler: a bounded prefix cache (an LRU
of chained hashes of 16-token blocks, `vllm/v1/core/kv_cache_utils.py`),
prefill time proportional to the tokens not in it, decode time per token,
and `--slots` requests at once with a FIFO queue behind. A token is 4
characters of prompt. The proxy under test is a real `llmproxy serve`
process (a chat-to-completions route over the K engines), restarted for each
run so each starts cold; the load client is in this process.

Workloads (`--sessions` x `--turns`, sessions started 50 ms apart, think
time between turns):
  a  agent sessions: a shared system prompt, a history of its own, then each
     turn appends ~`--turn-tokens` (the reply and the next question);
  b  the same sizes, but every request a fresh prompt: nothing shared;
  hot  (a) plus one hot conversation that sends 10 requests at once each turn
     (its whole conversation plus a short question of its own each, as an
     agent fanning out tool calls): 10x the others' requests, all continuing
     the same prompt, so affinity alone would queue them on one engine.
Engines' caches hold about one engine's share of the sessions (`--cache`),
so a session spread over all of them thrashes them.

Each run prints TTFT p50/p99 (client side, through the proxy), prefill tokens
computed (and as a share of round-robin's), cache-hit ratio, requests per
replica (max / mean), and the proxy's CPU per request (utime + stime from
/proc). The balancer's own cost is measured in-process on the workload's
prompts: hashing (per request) and the choice (per request, at K upstreams).
Targets are reported as pass/miss, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aiohttp
import procs
from aiohttp import web

CHARS_PER_TOKEN = 4
ENGINE_BLOCK = 16 * CHARS_PER_TOKEN  # vLLM's default block_size, 16 tokens


class Engine:
    """One fake engine: prefix cache, slots, prefill and decode time."""

    def __init__(self, slots: int, cache_tokens: int, prefill_us: float, decode_ms: float) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.capacity = cache_tokens // (ENGINE_BLOCK // CHARS_PER_TOKEN)
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.prefill_s = prefill_us / 1e6
        self.decode_s = decode_ms / 1e3
        self.requests = 0
        self.prompt_tokens = 0
        self.computed_tokens = 0

    def _blocks(self, prompt: str) -> list[int]:
        out, h = [], 0
        for i in range(0, len(prompt) - ENGINE_BLOCK + 1, ENGINE_BLOCK):
            h = hash((h, prompt[i:i + ENGINE_BLOCK]))
            out.append(h)
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        prompt: str = doc["prompt"]
        max_tokens = int(doc.get("max_tokens") or 16)
        blocks = self._blocks(prompt)
        tokens = len(prompt) // CHARS_PER_TOKEN
        async with self.slots:  # FIFO: waiters are woken in order
            cache = self.cache
            hit = 0
            for h in blocks:  # the longest cached prefix, at admission time
                if h not in cache:
                    break
                hit += 1
            computed = tokens - hit * (ENGINE_BLOCK // CHARS_PER_TOKEN)
            self.requests += 1
            self.prompt_tokens += tokens
            self.computed_tokens += computed
            await asyncio.sleep(computed * self.prefill_s)
            for h in reversed(blocks):  # the head most recent: the tail is evicted first, as vLLM frees it
                cache[h] = None
                cache.move_to_end(h)
            while len(cache) > self.capacity:
                cache.popitem(last=False)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            events = 4
            for k in range(events):
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "text": f"w{k} " * (max_tokens // events), "logprobs": None,
                                      "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(self.decode_s * max_tokens / events)
            last = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp


async def start_engines(k: int, args: argparse.Namespace) -> tuple[list[Engine], list[web.AppRunner], list[int]]:
    engines, runners, ports = [], [], []
    for _ in range(k):
        e = Engine(args.slots, args.cache, args.prefill_us, args.decode_ms)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", e.handle)
        app.router.add_get("/v1/models", lambda r: web.json_response({"object": "list", "data": []}))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = procs.free_port()
        await web.TCPSite(runner, procs.HOST, port).start()
        engines.append(e)
        runners.append(runner)
        ports.append(port)
    return engines, runners, ports


def words(seed: str, tokens: int) -> str:
    """`tokens` tokens of text unique to `seed` (4 characters a token)."""
    rnd = random.Random(seed)
    return "".join(f"{rnd.randrange(1000):03d} " for _ in range(tokens))


class Load:
    """The client: sessions of turns through the proxy, TTFT per request."""

    def __init__(self, base: str, args: argparse.Namespace, workload: str) -> None:
        self.url = f"{base}/v1/chat/completions"
        self.args = args
        self.workload = workload
        self.system = words("system", args.system_tokens)
        self.ttft: dict[str, list[float]] = {}  # session -> TTFTs (s)
        self.errors = 0

    async def run(self) -> None:
        a = self.args
        conns = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=a.deadline)
        async with aiohttp.ClientSession(connector=conns, timeout=timeout) as client:
            jobs = []
            for s in range(a.sessions):
                jobs.append(self.session(client, f"s{s}", s * 0.05))
            if self.workload == "hot":
                jobs.append(self.session(client, "hot", 0.0, fan_out=10))
            await asyncio.wait_for(asyncio.gather(*jobs), a.deadline)

    async def session(self, client: aiohttp.ClientSession, name: str, delay: float, fan_out: int = 1) -> None:
        a = self.args
        rnd = random.Random(name)
        await asyncio.sleep(delay)
        shared = self.workload != "b"
        messages: list[dict[str, str]] = []
        if shared:
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": words(name + "history", a.history_tokens)}]
        for t in range(a.turns):
            if shared:
                messages.append({"role": "user", "content": words(f"{name}.{t}", a.turn_tokens)})
            else:  # a fresh prompt of the same size as (a)'s turn t
                size = a.system_tokens + a.history_tokens + a.turn_tokens * (t + 1)
                messages = [{"role": "user", "content": words(f"{name}.{t}.fresh", size)}]
            if fan_out == 1:
                text = await self.request(client, name, messages)
            else:  # the same conversation, each with a short question of its own
                asks = [messages[:-1] + [{"role": "user", "content": messages[-1]["content"] + words(f"{name}.{t}.{j}", 200)}]
                        for j in range(fan_out)]
                texts = await asyncio.gather(*(self.request(client, name, m) for m in asks))
                text = texts[0]
            if text is None:
                continue
            if shared:
                messages.append({"role": "assistant", "content": text})
            await asyncio.sleep(rnd.uniform(0, 2 * a.think_ms / 1000))

    async def request(self, client: aiohttp.ClientSession, name: str, messages: list[dict[str, str]]) -> str | None:
        """One streamed request; its TTFT is recorded under the session's name; the answer's text."""
        body = {"model": "m", "messages": messages, "stream": True, "max_tokens": self.args.max_tokens}
        t0 = time.perf_counter()
        first = None
        text = []
        try:
            async with client.post(self.url, json=body) as r:
                if r.status != 200:
                    self.errors += 1
                    await r.read()
                    return None
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    doc = json.loads(line[6:])
                    for c in doc.get("choices", []):
                        piece = (c.get("delta") or {}).get("content")
                        if piece:
                            if first is None:
                                first = time.perf_counter() - t0
                            text.append(piece)
        except (aiohttp.ClientError, TimeoutError):
            self.errors += 1
            return None
        if first is not None:
            self.ttft.setdefault(name, []).append(first)
        return "".join(text)


ROUTE = """\
name: fleet
path: /v1/chat/completions
adapter: chat-to-completions
upstream: [{upstreams}]
balance: {balance}
timeout: {{connect: 5, read: 300}}
"""


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def one_run(args: argparse.Namespace, src: Path, workload: str, policy: str, margin: int) -> dict[str, Any]:
    engines, runners, ports = await start_engines(args.k, args)
    try:
        with tempfile.TemporaryDirectory(prefix="llmproxy-fleet-") as tmp:
            routes = Path(tmp) / "routes.d"
            routes.mkdir()
            balance = f"{{policy: {policy}, spill_margin: {margin}}}"
            ups = ", ".join(f"http://{procs.HOST}:{p}/v1/completions" for p in ports)
            (routes / "fleet.yaml").write_text(ROUTE.format(upstreams=ups, balance=balance))
            port = procs.free_port()
            env = procs.bench_env(src)
            env["QWEN_BASE_URL"] = f"http://{procs.HOST}:{ports[0]}"  # never the shipped default address
            proxy = procs._spawn("proxy", [args.python, "-m", "proxy", "serve", "--routes", str(routes), "--host",
                                           procs.HOST, "--port", str(port), "--log-level", "warning"],
                                 env, src, Path(tmp))  # fmt: skip
            try:
                await asyncio.to_thread(procs._wait_ready, proxy, port, "/readyz")
                load = Load(f"http://{procs.HOST}:{port}", args, workload)
                cpu0 = proxy.cpu()
                t0 = time.monotonic()
                await load.run()
                wall = time.monotonic() - t0
                cpu = proxy.cpu() - cpu0
                metrics = await asyncio.to_thread(_get_text, port, "/metrics")
            finally:
                proxy.stop()
    finally:
        for r in runners:
            await r.cleanup()
    reqs = [e.requests for e in engines]
    prompt = sum(e.prompt_tokens for e in engines)
    computed = sum(e.computed_tokens for e in engines)
    others = [v for name, vs in load.ttft.items() if not name.startswith("hot") for v in vs]
    every = [v for vs in load.ttft.values() for v in vs]
    return {
        "workload": workload, "policy": policy, "margin": margin,
        "requests": sum(reqs), "errors": load.errors, "wall_s": round(wall, 1),
        "ttft_p50_ms": _ms(pct(others, 0.5)), "ttft_p99_ms": _ms(pct(others, 0.99)),
        "ttft_all_p50_ms": _ms(pct(every, 0.5)), "ttft_all_p99_ms": _ms(pct(every, 0.99)),
        "prompt_tokens": prompt, "computed_tokens": computed,
        "hit_ratio": round(1 - computed / prompt, 3) if prompt else None,
        "replica_max_over_mean": round(max(reqs) / statistics.mean(reqs), 2) if sum(reqs) else None,
        "per_replica": reqs,
        "proxy_cpu_us_per_req": round(cpu / max(1, sum(reqs)) * 1e6),
        "choices": _choices(metrics),
    }


def _get_text(port: int, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection(procs.HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _choices(metrics: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("llmproxy_upstream_choices_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def balancer_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The balancer alone, in this process: hashing a rendered prompt of workload (a)'s sizes, and
    the choice at K upstreams (choose + release), µs per request."""
    sys.path.insert(0, str(args.src))
    from proxy.balance import Hint
    from proxy.config import Balance
    from proxy.upstreams import Pool

    pool = Pool("cost", [f"http://127.0.0.1:{9000 + i}/v1/completions" for i in range(args.k)], None,
                Balance(policy="prefix", spill_margin=args.margin))
    balancer = pool.balancer
    assert balancer is not None
    system = words("system", args.system_tokens)
    prompts = [system + words(f"c{c}", args.history_tokens + args.turn_tokens * t)
               for c in range(8) for t in (0, args.turns // 2, args.turns - 1)]

    class Call:
        def __init__(self, prompt: str) -> None:
            self.prompt = prompt

    calls = [Call(p) for p in prompts]
    hints = [balancer.hint(c, b"", []) for c in calls]
    for h in hints:  # remember them: the choice then finds continuations
        balancer.release(balancer.choose(h)[0])
    n = 2000
    t0 = time.process_time()
    for i in range(n):
        balancer.hint(calls[i % len(calls)], b"", [])
    hash_us = (time.process_time() - t0) / n * 1e6
    # passthrough: the body's `messages` read raw (msgspec skips the rest), then hashed
    bodies = [json.dumps({"model": "m", "messages": [{"role": "system", "content": system},
                                                      {"role": "user", "content": c.prompt[len(system):]}],
                          "stream": True}).encode() for c in calls]
    raw = type("Raw", (), {"prompt": None})()
    t0 = time.process_time()
    for i in range(n):
        balancer.hint(raw, bodies[i % len(bodies)], [])
    body_us = (time.process_time() - t0) / n * 1e6
    nxt = [Hint(h.blocks + [h.blocks[-1] ^ 1], None) for h in hints]  # next turns: a new tip past the old
    t0 = time.process_time()
    for i in range(n):
        m, _ = balancer.choose(nxt[i % len(nxt)])
        balancer.release(m)
    choose_us = (time.process_time() - t0) / n * 1e6
    new = [Hint([random.getrandbits(63) for _ in range(len(h.blocks))], None) for h in hints]
    t0 = time.process_time()
    for i in range(n):
        m, _ = balancer.choose(new[i % len(new)])
        balancer.release(m)
    choose_new_us = (time.process_time() - t0) / n * 1e6
    kib = statistics.mean(len(p) for p in prompts) / 1024
    return {"prompt_kib": round(kib), "hash_us": round(hash_us, 1), "passthrough_hint_us": round(body_us, 1),
            "choose_continuation_us": round(choose_us, 1),
            "choose_new_us": round(choose_new_us, 1)}


def render(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [f"fleet bench: K={a['k']} engines x {a['slots']} slots, cache {a['cache']} tokens each, prefill "
             f"{a['prefill_us']} µs/token, decode {a['decode_ms']} ms/token; {a['sessions']} sessions x {a['turns']} "
             f"turns, system {a['system_tokens']} + history {a['history_tokens']} + {a['turn_tokens']}/turn tokens, "
             f"think ~{a['think_ms']} ms; spill_margin {a['margin']}"]
    head = ("workload", "policy", "margin", "TTFT p50 ms", "TTFT p99 ms", "prefill tokens", "vs RR", "cache hit",
            "req/replica max/mean", "proxy µs/req", "choices", "errors")
    rows = []
    for r in report["runs"]:
        rr = next((x for x in report["runs"] if x["workload"] == r["workload"] and x["policy"] == "round-robin"), None)
        share = f"{r['computed_tokens'] / rr['computed_tokens']:.0%}" if rr and rr["computed_tokens"] else "-"
        rows.append((r["workload"], r["policy"], str(r["margin"]) if r["policy"] == "prefix" else "-",
                     str(r["ttft_p50_ms"]), str(r["ttft_p99_ms"]), f"{r['computed_tokens']:,}", share,
                     f"{r['hit_ratio']:.0%}" if r["hit_ratio"] is not None else "-",
                     f"{r['replica_max_over_mean']}", str(r["proxy_cpu_us_per_req"]),
                     " ".join(f"{k}={v}" for k, v in sorted(r["choices"].items())) or "-", str(r["errors"])))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.extend("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows)
    c = report.get("cost")
    if c:
        lines.append(f"balancer cost (in-process, K={a['k']}, prompts ~{c['prompt_kib']} KiB): hashing "
                     f"{c['hash_us']} µs/request (passthrough, reading `messages` from the body too: {c['passthrough_hint_us']} µs); choice {c['choose_continuation_us']} µs (continuation), "
                     f"{c['choose_new_us']} µs (new conversation)")
    lines.extend(report.get("goals", []))
    return "\n".join(lines)


def goals(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]

    def get(w: str, p: str, m: int | None = None) -> dict[str, Any] | None:
        return next((r for r in runs if r["workload"] == w and r["policy"] == p and (m is None or r["margin"] == m)),
                    None)

    out = []
    margin = report["args"]["margin"]
    rr, px, lb = get("a", "round-robin"), get("a", "prefix", margin), get("a", "least-busy")
    if rr and px:
        share = px["computed_tokens"] / rr["computed_tokens"]
        out.append(f"target (a) prefix prefill <= 25% of round-robin: {share:.0%} {'pass' if share <= 0.25 else 'miss'}")
        ratio = px["ttft_p50_ms"] / rr["ttft_p50_ms"]
        out.append(f"target (a) prefix TTFT p50 <= 1/3 of round-robin: {ratio:.2f} {'pass' if ratio <= 1 / 3 else 'miss'}")
    bp, bl = get("b", "prefix", margin), get("b", "least-busy")
    if bp and bl:
        p50 = bp["ttft_p50_ms"] / bl["ttft_p50_ms"]
        p99 = bp["ttft_p99_ms"] / bl["ttft_p99_ms"]
        ok = p50 <= 1.1 and p99 <= 1.1 and bp["replica_max_over_mean"] <= 1.5
        out.append(f"target (b) prefix vs least-busy TTFT p50 x{p50:.2f}, p99 x{p99:.2f}, replica max/mean "
                   f"{bp['replica_max_over_mean']}: {'pass' if ok else 'miss'}")
    hot, calm = get("hot", "prefix", margin), get("a", "prefix", margin)
    if hot and calm:
        r = hot["ttft_p99_ms"] / calm["ttft_p99_ms"]
        out.append(f"target hot session: the others' TTFT p99 x{r:.2f} of the run without it: "
                   f"{'pass' if r <= 1.5 else 'miss'}")
    c = report.get("cost")
    if c:
        ok = c["choose_continuation_us"] <= 10 and c["choose_new_us"] <= 10
        out.append(f"target choice <= 10 µs at K={report['args']['k']}: {c['choose_continuation_us']} / "
                   f"{c['choose_new_us']} µs {'pass' if ok else 'miss'} (hashing, {c['hash_us']} µs, is per KiB of "
                   "prompt and reported apart)")
    return out


def parse_plan(text: str) -> list[tuple[str, str, int | None]]:
    """`a:round-robin,a:prefix@2,...` -> [(workload, policy, margin or None)]."""
    out = []
    for item in text.split(","):
        w, _, rest = item.partition(":")
        policy, _, m = rest.partition("@")
        out.append((w, policy, int(m) if m else None))
    return out


DEFAULT_PLAN = ("a:round-robin,a:least-busy,a:prefix,b:round-robin,b:least-busy,b:prefix,hot:least-busy,hot:prefix")


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--fleet")
    g.add_argument("--fleet", action="store_true", help="the fleet-routing bench instead (bench/fleet.py)")
    g.add_argument("--k", type=int, default=4, help="engines (default 4)")
    g.add_argument("--slots", type=int, default=4, help="requests at once per engine (default 4)")
    g.add_argument("--cache", type=int, default=256_000, help="prefix cache per engine, tokens (default 256000)")
    g.add_argument("--prefill-us", type=float, default=10.0, help="prefill µs per uncached token (default 10)")
    g.add_argument("--decode-ms", type=float, default=2.0, help="decode ms per token (default 2)")
    g.add_argument("--sessions", type=int, default=32)
    g.add_argument("--turns", type=int, default=12)
    g.add_argument("--system-tokens", type=int, default=4000)
    g.add_argument("--history-tokens", type=int, default=16000)
    g.add_argument("--turn-tokens", type=int, default=2000)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--think-ms", type=float, default=200.0, help="mean think time between turns (default 200)")
    g.add_argument("--margin", type=int, default=None, help="spill_margin for prefix (default: the shipped one)")
    g.add_argument("--plan", default=DEFAULT_PLAN,
                   help="comma list of WORKLOAD:POLICY[@MARGIN] runs, workloads a, b, hot (default: %(default)s)")
    g.add_argument("--deadline", type=float, default=180.0, help="seconds at most per run (default 180)")


def main(args: argparse.Namespace, src: Path) -> int:
    sys.path.insert(0, str(src))
    from proxy.balance import DEFAULT_MARGIN

    args.src = src
    if args.margin is None:
        args.margin = DEFAULT_MARGIN
    if args.quick:
        args.sessions, args.turns = 8, 4
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}}
    report["cost"] = balancer_cost(args)
    runs = []
    for workload, policy, m in parse_plan(args.plan):
        margin = args.margin if m is None else m
        print(f"  {workload} {policy}{f' margin {margin}' if policy == 'prefix' else ''} ...", file=sys.stderr,
              flush=True)
        runs.append(asyncio.run(one_run(args, src, workload, policy, margin)))
    report["runs"] = runs
    report["goals"] = goals(report)
    print(render(report))
    out = args.out.with_name("fleet.json") if args.out.name == "latest.json" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {out}")
    return 0
