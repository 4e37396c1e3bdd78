"""Shared state (`serve --state redis://…`) against a real `redis-server` on a loopback port, with
several real `llmproxy serve` processes sharing it; and the same operations in-process without it.

The Justfile's test recipe installs Debian's `redis-server` when it is missing; these tests skip
(with that message) only when it could not be installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import load_keys
from proxy.state import Local, State, check_url, redact
from servers import free_port, stop, wait_ready

PASSWORD = "pw-Zq8s3cretNeverLogged"
ALICE, BOB, ROOT = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdefgh", "sk-root-0123456789abcdefg"
CAROL = "sk-carol-0123456789abcdef"
KEYS = f"""keys:
  - name: alice
    key: {ALICE}
    max_concurrent: 3
    queue: 200
    queue_timeout: 30
    tokens_per_minute: 30
  - name: bob
    key: {BOB}
  - name: root
    key: {ROOT}
    admin: true
  - name: carol
    key: {CAROL}
    max_concurrent: 2
"""
LEASE_TTL = 2  # seconds: a killed process's slots must come back within this


class RedisServer:
    """A real redis-server on a free loopback port, no persistence; can be stopped and started again."""

    def __init__(self, exe: str, folder: Path) -> None:
        self.exe = exe
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD, "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, socket_timeout=2)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if exe is None:
        pytest.skip("redis-server is not installed and could not be installed (`just test` runs "
                    "`apt-get install -y redis-server` when it is missing): the shared-state tests need a real one")
    server = RedisServer(exe, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisServer]:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.client().flushall()
    yield redis_server
    if redis_server.proc is None:
        redis_server.start()


@pytest.fixture
def folder(routes_dir, upstream) -> Path:
    upstream.mock.track_peak = True
    return routes_dir(
        completions=f"""
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
        """,
        chat=f"""
            path: /v1/chat/completions
            upstream: {upstream.url}/v1/completions
            adapter: chat-to-completions
        """,
        responses=f"""
            path: /v1/responses
            upstream: {upstream.url}/v1/completions
            adapter: responses-to-completions
        """,
        limited=f"""
            path: /v1/limited
            upstream: {upstream.url}/v1/completions
            limits: {{max_concurrent: 2, queue: 100, queue_timeout: 30}}
        """,
    )


class Proxy:
    def __init__(self, proc: subprocess.Popen[bytes], base: str, err: Path) -> None:
        self.proc, self.base, self.err = proc, base, err

    def log(self) -> str:
        """What it wrote: its log (stderr), then its access lines (stdout)."""
        return self.err.read_text() + self.err.with_suffix(".stdout").read_text()


@pytest.fixture
def serve(folder: Path, tmp_path: Path) -> Iterator[Any]:
    """`serve(*args)`: a `llmproxy serve` process over the routes and keys, ready; stopped at the end."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "LLMPROXY_STATE")}
    with ExitStack() as stack:

        def start(*args: str) -> Proxy:
            port = free_port()
            err = tmp_path / f"serve-{port}.stderr"
            with err.open("wb") as stderr, err.with_suffix(".stdout").open("wb") as stdout:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--keys", str(keys),
                     "--port", str(port), "--log-format", "text", *args],
                    stdout=stdout, stderr=stderr, env=env,
                )  # fmt: skip
            stack.callback(lambda: proc.poll() is None and stop(proc))
            base = f"http://127.0.0.1:{port}"
            wait_ready(proc, base, err)
            return Proxy(proc, base, err)

        yield start


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def minute_start(client: Any) -> int:
    """Move the store's clock (`llmproxy:clock`, an offset to its TIME) to 1 s into a minute, so that a
    test's requests share one minute's window instead of straddling a boundary; the offset set."""
    now = int(client.time()[0])
    offset = 61 - now % 60
    client.set("llmproxy:clock", offset)
    return offset


def wait_until(check: Any, within: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(every)


COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 3}


def _both_back(c: httpx.Client, opened: Any, closed: Any, when: str) -> None:
    """The store is answering again: `closed` serves again, and `opened` counts in it again — it
    looks at the store a second after its last failure (RETRY_DOWN), counting in the process until
    then; its /v1/usage says which, without counting a request."""
    wait_until(lambda: c.post(f"{closed.base}/v1/completions", json=COMPLETION, headers=auth(CAROL)).status_code
               == 200, 10, f"closed did not recover {when}", every=0.2)  # fmt: skip
    wait_until(lambda: c.get(f"{opened.base}/v1/usage", headers=auth(CAROL)).json()["data"][0]["shared"], 10,
               f"opened did not use the store again {when}")  # fmt: skip


def test_max_concurrent_3_holds_across_processes_under_100_concurrent_requests(store, serve, upstream):
    """`--workers 2` plus a second serve: three processes, one key's `max_concurrent: 3`, 100 requests
    at once; the upstream never sees more than 3 in flight, and every request is served."""
    a = serve("--state", store.url, "--workers", "2")
    b = serve("--state", store.url)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(
                c.post(f"{(a, b)[i % 2].base}/v1/completions", json=COMPLETION,
                       headers={**auth(ALICE), "x-mock-stall-ms": "60"})
                for i in range(100)))  # fmt: skip

    started = time.monotonic()
    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 100
    assert upstream.mock.peak_busy == 3
    assert time.monotonic() - started < 40
    # Every lease given back (a lease goes back after its answer's last bytes: wait for the last one).
    wait_until(lambda: store.client().zcard("llmproxy:slots:key:alice") == 0, 5, "a lease was not given back")

    # A route's `limits` are shared the same way (bob's key has no limit of its own).
    upstream.mock.peak_busy = 0

    async def route() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=30)) as c:
            return [r.status_code for r in await asyncio.gather(*(
                c.post(f"{(a, b)[i % 2].base}/v1/limited", json=COMPLETION, headers={**auth(BOB), "x-mock-stall-ms": "60"})
                for i in range(30)))]  # fmt: skip

    assert asyncio.run(route()) == [200] * 30
    assert upstream.mock.peak_busy == 2
    for p in (a, b):
        assert PASSWORD not in p.log()


def test_kill_9_of_a_process_holding_slots_frees_them_within_the_lease_ttl(store, serve, upstream):
    a = serve("--state", store.url, "--state-lease-ttl", str(LEASE_TTL))
    b = serve("--state", store.url, "--state-lease-ttl", str(LEASE_TTL))

    async def run() -> float:
        async with httpx.AsyncClient(timeout=20) as c:
            held = [asyncio.ensure_future(c.post(f"{a.base}/v1/completions", json={**COMPLETION, "stream": True},
                                                 headers={**auth(ALICE), "x-mock-hold": f"k{i}"}))
                    for i in range(3)]  # fmt: skip
            deadline = time.monotonic() + 10
            while store.client().zcard("llmproxy:slots:key:alice") < 3:
                assert time.monotonic() < deadline, "the three slots were not taken"
                await asyncio.sleep(0.05)
            # The three slots are held (renewed by a): b's request queues.
            waiting = asyncio.ensure_future(c.post(f"{b.base}/v1/completions", json=COMPLETION, headers=auth(ALICE)))
            await asyncio.sleep(LEASE_TTL + 0.5)
            assert not waiting.done()  # the leases are renewed while their requests run: no slot is counted twice
            a.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            r = await waiting
            assert r.status_code == 200
            for h in held:
                h.cancel()
            return time.monotonic() - killed

    took = asyncio.run(run())
    assert took < LEASE_TTL + 1.5  # the TTL, plus the queue's polling and a loaded machine's slack


def test_tokens_per_minute_refuses_after_the_crossing_request_and_admits_when_the_window_moves(store, serve):
    """alice's `tokens_per_minute: 30`: one answer of ~45 tokens crosses it; the next request, on the
    other process, is refused with the quota named; the store's clock moved a minute on admits again."""
    a = serve("--state", store.url)
    b = serve("--state", store.url)
    offset = minute_start(store.client())  # the first and the refused request in one window
    chat = {"model": "m", "messages": [{"role": "user", "content": "count"}]}
    words = {"x-mock-text": " ".join(["word"] * 40)}
    with httpx.Client(timeout=10) as c:
        first = c.post(f"{a.base}/v1/chat/completions", json=chat, headers={**auth(ALICE), **words})
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 40
        refused = c.post(f"{b.base}/v1/chat/completions", json=chat, headers=auth(ALICE))
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "tokens_per_minute" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert c.post(f"{b.base}/v1/chat/completions", json=chat, headers=auth(BOB)).status_code == 200  # alice's only

        # A streamed answer is charged too (bob has no quota: its usage shows it).
        with c.stream("POST", f"{a.base}/v1/chat/completions", json={**chat, "stream": True},
                      headers={**auth(BOB), **words}) as s:  # fmt: skip
            assert "[DONE]" in s.read().decode()

        store.client().set("llmproxy:clock", offset + 60)  # the store's clock, a minute on: the window moved
        assert c.post(f"{a.base}/v1/chat/completions", json=chat, headers=auth(ALICE)).status_code == 200

        own = c.get(f"{a.base}/v1/usage", headers=auth(BOB)).json()["data"]
        assert [u["name"] for u in own] == ["bob"]
        assert own[0]["shared"] is True and own[0]["total"]["requests"] == 2 and own[0]["total"]["tokens"] > 40
        every = c.get(f"{b.base}/v1/usage", headers=auth(ROOT)).json()
        assert "data" in every, every
        every = every["data"]
        alice = next(u for u in every if u["name"] == "alice")
        assert [u["name"] for u in every] == ["alice", "bob", "root", "carol"]
        assert alice["total"]["requests"] == 2 and alice["minute"]["tokens_limit"] == 30  # the refused one is not counted
        metrics = c.get(f"{a.base}/metrics").text
        assert 'llmproxy_key_tokens_total{key="alice",kind="completion"}' in metrics
        assert ALICE not in metrics


def test_the_request_right_after_the_crossing_answer_is_refused_even_with_a_slow_store(store, routes_dir, upstream,
                                                                                       proxy_for, tmp_path: Path):
    """README: "the request after the one that crossed it is refused". The answer's tokens are charged
    before its last bytes go out, so a client that asks again the moment its answer ends (here or on
    another replica) finds them counted, however long the store takes to take the charge (0.3 s here,
    a delay put in front of the real store's charge)."""
    from proxy.keys import KeysHolder

    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - name: alice\n    key: {ALICE}\n    tokens_per_minute: 30\n")
    minute_start(store.client())
    state = State(store.url)
    charge = state.charge

    async def slow_charge(*args: Any, **kw: Any) -> None:
        await asyncio.sleep(0.3)
        await charge(*args, **kw)

    state.charge = slow_charge  # type: ignore[method-assign]
    base = proxy_for(routes_dir(chat=f"""
        path: /v1/chat/completions
        upstream: {upstream.url}/v1/completions
        adapter: chat-to-completions
    """), keys=KeysHolder.load(keys), state=state)
    chat = {"model": "m", "messages": [{"role": "user", "content": "count"}]}
    with httpx.Client(timeout=10, headers=auth(ALICE)) as c:
        for stream in (False, True):
            with c.stream("POST", f"{base}/v1/chat/completions", json={**chat, "stream": stream},
                          headers={"x-mock-text": " ".join(["word"] * 40)}) as first:  # fmt: skip
                first.read()
            assert first.status_code == 200
            refused = c.post(f"{base}/v1/chat/completions", json=chat)
            assert refused.status_code == 429 and "tokens_per_minute" in refused.json()["error"]["message"]
            store.client().incr("llmproxy:clock", 60)  # the next minute, for the streamed answer


def test_a_responses_conversation_started_on_one_process_continues_on_the_other(store, serve, upstream):
    a = serve("--state", store.url)
    b = serve("--state", store.url)
    import json

    import openai

    on_a = openai.OpenAI(base_url=f"{a.base}/v1", api_key=ALICE, max_retries=0, timeout=10)
    on_b = openai.OpenAI(base_url=f"{b.base}/v1", api_key=ALICE, max_retries=0, timeout=10)
    first = on_a.responses.create(model="q", input="My name is Ada.")
    second = on_b.responses.create(model="q", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert "My name is Ada." in prompt and "What is my name?" in prompt
    bob = openai.OpenAI(base_url=f"{b.base}/v1", api_key=BOB, max_retries=0, timeout=10)
    with pytest.raises(openai.NotFoundError):  # only the key that made it may continue it
        bob.responses.create(model="q", input="x", previous_response_id=first.id)
    assert store.client().pttl(f"llmproxy:resp:{first.id}") > 0  # kept with a TTL


def test_store_stopped_mid_run_open_serves_closed_answers_503_and_both_recover(store, serve):
    """Every path that asks the store (a key's slot and quota, /v1/usage, a stored response's load
    and save) answers at once while it is down, by its policy; and uses it again when it is back,
    restarted empty on the same port, without a restart of the proxy."""
    opened = serve("--state", store.url)
    closed = serve("--state", store.url, "--state-failure", "closed")
    previous = {"model": "q", "input": "x", "previous_response_id": "resp_unknown"}

    def timed(method: str, url: str, **kw: Any) -> httpx.Response:
        started = time.monotonic()
        r = c.request(method, url, **kw)
        assert time.monotonic() - started < 2.5, f"{method} {url} hung on the dead store"
        return r

    with httpx.Client(timeout=10) as c:
        for p in (opened, closed):
            assert c.post(f"{p.base}/v1/completions", json=COMPLETION, headers=auth(CAROL)).status_code == 200
        store.stop()
        for _ in range(3):
            for p, want in ((opened, 200), (closed, 503)):
                r = timed("POST", f"{p.base}/v1/completions", json=COMPLETION, headers=auth(CAROL))
                assert r.status_code == want, r.text
                if want == 503:
                    error = r.json()["error"]
                    assert error["code"] == "state_store_unavailable"
                    assert f"redis://***@127.0.0.1:{store.port}/0" in error["message"]
                    assert PASSWORD not in r.text
                usage = timed("GET", f"{p.base}/v1/usage", headers=auth(CAROL))
                assert usage.status_code == want, usage.text
                r = timed("POST", f"{p.base}/v1/responses", json=previous, headers=auth(BOB))
                assert r.status_code == (404 if want == 200 else 503), r.text
                r = timed("POST", f"{p.base}/v1/responses", json={"model": "q", "input": "hi"}, headers=auth(BOB))
                assert r.status_code == want, r.text
        # open: the figures are this process's own while the store is down, and say so
        assert c.get(f"{opened.base}/v1/usage", headers=auth(CAROL)).json()["data"][0]["shared"] is False
        for p, policy in ((opened, "open"), (closed, "closed")):
            metrics = c.get(f"{p.base}/metrics").text
            assert "llmproxy_state_up 0.0" in metrics
            assert f'llmproxy_state_unavailable_total{{policy="{policy}"}}' in metrics
        store.start()
        _both_back(c, opened, closed, "when the store came back")
        for p in (opened, closed):  # slots, quotas and usage: through the store again
            assert c.post(f"{p.base}/v1/completions", json=COMPLETION, headers=auth(CAROL)).status_code == 200
        usage = c.get(f"{opened.base}/v1/usage", headers=auth(CAROL)).json()["data"][0]
        assert usage["shared"] is True and usage["total"]["requests"] == 3  # counted in the restarted store
        first = c.post(f"{opened.base}/v1/responses", json={"model": "q", "input": "My name is Ada."},
                       headers=auth(BOB)).json()  # fmt: skip
        assert store.client().exists(f"llmproxy:resp:{first['id']}")  # saved in the store again
        second = c.post(f"{closed.base}/v1/responses", json={"model": "q", "input": "And?",
                                                             "previous_response_id": first["id"]}, headers=auth(BOB))
        assert second.status_code == 200, second.text  # loaded from it by the other process
    for p in (opened, closed):
        log = p.log()
        assert "unavailable" in log and PASSWORD not in log
    assert opened.log().count("shared state store") <= 3  # a warning once per minute, not per request
    assert "answers again" in closed.log()


# --- without a store: the same operations in one process -----------------------------------------


def test_in_process_quota_windows_move_with_the_clock():
    local = Local()
    now = [60 * 20_000 + 20.0]  # 20 s into a minute
    local.clock = lambda: now[0]
    assert local.admit("k", 30, 0, 0) == ("", 20_000, 20_000 * 60 // 86400)  # counted in this minute and day
    local.charge("k", 20, 25)
    assert local.admit("k", 30, 0, 0) == ("tokens_per_minute", 45, 40)
    assert local.admit("k", 0, 0, 1) == ("requests_per_minute", 1, 40)
    now[0] += 40
    assert local.admit("k", 30, 0, 1)[0] == ""
    (u,) = local.usage(["k"])
    assert (u.minute_requests, u.day_tokens, u.requests, u.prompt_tokens) == (1, 45, 2, 20)


def test_in_process_responses_are_bounded_in_number_and_time():
    """Without --state: at most `--responses-max` kept (the oldest dropped first), each for `--responses-ttl`."""
    local = Local(responses_max=2)
    for rid in ("a", "b", "c"):
        local.save(rid, rid.encode(), ttl=60)
    assert (local.load("a"), local.load("b"), local.load("c")) == (None, b"b", b"c")
    local.save("d", b"d", ttl=0.05)
    time.sleep(0.2)
    assert local.load("d") is None and local.load("c") == b"c"


def test_quota_fields_are_checked_in_the_keys_file(tmp_path: Path):
    from proxy.errors import ConfigError

    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: a\n    key: {ALICE}\n    tokens_per_day: 0\n")
    with pytest.raises(ConfigError, match=r"keys\[0\].tokens_per_day: must be at least 1"):
        load_keys(path)
    path.write_text(f"keys:\n  - name: a\n    key: {ALICE}\n    requests_per_minute: 5\n    admin: true\n")
    assert load_keys(path)[0].requests_per_minute == 5


def test_the_store_url_is_checked_and_its_password_never_shown():
    from proxy.errors import ConfigError

    assert redact(f"redis://:{PASSWORD}@10.0.0.1:6379/2") == "redis://***@10.0.0.1:6379/2"
    assert redact("rediss://user:pw@h:6380/0") == "rediss://***@h:6380/0"
    assert redact(check_url("redis://:p%40s%2Fs%23w@h:1/0")) == "redis://***@h:1/0"  # percent-encoded, as redis-py decodes
    for bad in (f"http://:{PASSWORD}@h:1/0", f"redis://:{PASSWORD}@h:99999999/0", f"redis://:{PASSWORD}@h:1/x"):
        with pytest.raises(ConfigError) as err:
            check_url(bad)
        assert PASSWORD not in str(err.value)
    with pytest.raises(ConfigError, match="--state-failure"):
        State(failure="maybe")
    # A rediss:// URL names its CA (redis-py's own parameter); nothing else may ride in the query.
    assert check_url(f"rediss://:{PASSWORD}@h:1/0?ssl_ca_certs={__file__}")
    for bad, why in ((f"redis://:{PASSWORD}@h:1/0?socket_timeout=30", "query parameter 'socket_timeout' not taken"),
                     (f"redis://:{PASSWORD}@h:1/0?ssl_ca_certs={__file__}", "'ssl_ca_certs' not taken"),
                     (f"rediss://h:1/0?password={PASSWORD}", "'password' not taken"),
                     (f"rediss://:{PASSWORD}@h:1/0?ssl_ca_certs=/no/ca.pem", "ssl_ca_certs: no such file: /no/ca.pem")):
        with pytest.raises(ConfigError, match=why) as err:
            check_url(bad)
        assert PASSWORD not in str(err.value)


def test_serve_refuses_a_bad_state_url_naming_it_without_the_password(folder: Path):
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(free_port()),
                        "--state", f"redis://:{PASSWORD}@127.0.0.1:notaport/0"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "--state" in r.stderr and PASSWORD not in r.stderr + r.stdout


def test_without_a_store_a_messages_route_refuses_over_quota_in_anthropics_shape(routes_dir, upstream, proxy_for,
                                                                                 tmp_path: Path):
    """No --state: the quota is this process's; the 429 is Anthropic's rate_limit_error naming the quota."""
    from proxy.keys import KeysHolder

    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - name: alice\n    key: {ALICE}\n    requests_per_minute: 1\n")
    state = State()
    state.local.clock = lambda: 60 * 20_000 + 1.0  # 1 s into a minute: both requests in its window
    base = proxy_for(routes_dir(msg=f"""
        path: /v1/messages
        upstream: {upstream.url}/v1/completions
        adapter: messages-to-completions
    """), keys=KeysHolder.load(keys), state=state)
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10, headers={"x-api-key": ALICE}) as c:
        assert c.post(f"{base}/v1/messages", json=body).status_code == 200
        refused = c.post(f"{base}/v1/messages", json=body)
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
        err = refused.json()
        assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error"
        assert "requests_per_minute quota (1 of 1 used in this minute)" in err["error"]["message"]
        (usage,) = c.get(f"{base}/v1/usage").json()["data"]
        assert usage["shared"] is False and usage["minute"]["requests"] == 1 and usage["total"]["tokens"] > 0


DAVE = "sk-dave-0123456789abcdefg"


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "store"])
def test_a_request_refused_by_its_slots_is_not_counted_toward_requests_per_minute(shared, request, routes_dir,
                                                                                   upstream, proxy_for, tmp_path):
    """dave: `max_concurrent: 1`, no queue, `requests_per_minute: 2`. Three requests refused with a
    concurrency 429 while one runs never reached the upstream: they leave the quota as it was (the
    second forwarded request is admitted, the third refused by the quota), and /v1/usage shows 2."""
    from proxy.keys import KeysHolder

    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - name: dave\n    key: {DAVE}\n    max_concurrent: 1\n    requests_per_minute: 2\n")
    if shared:
        store = request.getfixturevalue("store")
        state = State(store.url)
        now = int(store.client().time()[0])
        store.client().set("llmproxy:clock", 61 - now % 60)  # 1 s into a minute: the test ends inside it
    else:
        state = State()
        state.local.clock = lambda: 60 * 20_000 + 1.0
    base = proxy_for(routes_dir(c=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
    """), keys=KeysHolder.load(keys), state=state)
    with httpx.Client(timeout=10, headers=auth(DAVE)) as c:
        with c.stream("POST", f"{base}/v1/completions", json={**COMPLETION, "stream": True},
                      headers={"x-mock-hold": "dave"}) as held:  # fmt: skip
            assert held.status_code == 200
            for _ in range(3):
                refused = c.post(f"{base}/v1/completions", json=COMPLETION)
                assert refused.status_code == 429 and "max_concurrent 1" in refused.json()["error"]["message"]
                assert int(refused.headers["retry-after"]) >= 1  # the limit's 429, as without a store
            httpx.post(f"{upstream.url}/_mock/release?key=dave")
            held.read()
        assert c.post(f"{base}/v1/completions", json=COMPLETION).status_code == 200
        over = c.post(f"{base}/v1/completions", json=COMPLETION)
        assert over.status_code == 429 and "requests_per_minute quota (2 of 2" in over.json()["error"]["message"]
        (usage,) = c.get(f"{base}/v1/usage").json()["data"]
    assert usage["shared"] is shared
    assert usage["minute"]["requests"] == 2 and usage["day"]["requests"] == 2 and usage["total"]["requests"] == 2


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed (openssl): (ca, cert, key)."""
    ca, ca_key, cert, key, csr = (folder / n for n in ("ca.crt", "ca.key", "server.crt", "server.key", "server.csr"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=30)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=llmproxy test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
        "-extfile", ext)
    return ca, cert, key


def test_a_quota_through_rediss_with_the_operators_ca(redis_server, routes_dir, upstream, proxy_for, tmp_path: Path):
    """`rediss://…?ssl_ca_certs=/path/ca.pem`: redis-py verifies the store's certificate (and its
    host name) against that CA; a quota counts in the store through TLS. Without the CA the store's
    certificate is refused: the store is unavailable, never used unverified."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a throwaway CA for the rediss:// test")
    from proxy.keys import KeysHolder

    ca, cert, key = _tls_files(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [redis_server.exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(ca))
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start with TLS"
                time.sleep(0.05)
        minute_start(client)  # the admitted and the refused request in one window
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
        keys = tmp_path / "keys.yaml"
        keys.write_text(f"keys:\n  - name: dave\n    key: {DAVE}\n    requests_per_minute: 1\n")
        base = proxy_for(routes_dir(c=f"""
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
        """), keys=KeysHolder.load(keys), state=State(f"{url}?ssl_ca_certs={ca}", failure="closed"))
        with httpx.Client(timeout=10, headers=auth(DAVE)) as c:
            assert c.post(f"{base}/v1/completions", json=COMPLETION).status_code == 200
            refused = c.post(f"{base}/v1/completions", json=COMPLETION)
            assert refused.status_code == 429 and "requests_per_minute" in refused.json()["error"]["message"]
            assert c.get(f"{base}/v1/usage").json()["data"][0]["shared"] is True
        assert client.hget("llmproxy:key:dave:total", "requests") == b"1"  # counted in the store, over TLS

        from proxy.errors import StateUnavailable

        unverified = State(url, failure="closed")  # no CA: the system's, which does not know this one

        async def refused_without_the_ca() -> None:
            with pytest.raises(StateUnavailable) as err:
                await unverified.admit(load_keys(keys)[0])
            assert PASSWORD not in str(err.value) and f"rediss://***@127.0.0.1:{port}/0" in str(err.value)

        asyncio.run(refused_without_the_ca())
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_wrong_or_unreachable_stores_password_shows_nowhere(store, serve, folder: Path, tmp_path: Path):
    """The password is never shown: not by a store that refuses it (closed: 503s), not by one that
    does not listen (open), not in the debug log with its access lines, /metrics, /v1/usage, a
    refused Responses continuation, `check` or `--help` with LLMPROXY_STATE set, nor a bad URL."""
    wrong = "pw-Wr0ngButSecret-Too"
    dead = free_port()
    refused = serve("--state", f"redis://:{wrong}@127.0.0.1:{store.port}/0", "--state-failure", "closed",
                    "--log-level", "debug")
    unreachable = serve("--state", f"redis://default:{wrong}@127.0.0.1:{dead}/0", "--log-level", "debug")
    seen = []
    with httpx.Client(timeout=10) as c:
        for p, want in ((refused, 503), (unreachable, 200)):
            r = c.post(f"{p.base}/v1/completions", json=COMPLETION, headers=auth(CAROL))
            assert r.status_code == want, r.text
            r2 = c.post(f"{p.base}/v1/responses", json={"model": "q", "input": "x", "previous_response_id": "resp_1"},
                        headers=auth(ALICE))  # fmt: skip
            assert r2.status_code == (503 if want == 503 else 404), r2.text
            r3 = c.get(f"{p.base}/v1/usage", headers=auth(ROOT))
            assert r3.status_code == want, r3.text
            seen += [r.text, r2.text, r3.text, c.get(f"{p.base}/metrics").text]
        assert "redis://***@127.0.0.1" in seen[0]  # the 503 names the store, masked
    env = {**os.environ, "LLMPROXY_STATE": f"redis://:{wrong}@127.0.0.1:{dead}/0"}
    for args in (["check", "--routes", str(folder)], ["serve", "--help"],
                 ["serve", "--routes", str(folder), "--state", f"redis://:{wrong}@/0"],
                 ["serve", "--routes", str(folder), "--state", f"rediss://:{wrong}@h:1/0?ssl_ca_certs=/no"]):
        r = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, env=env, timeout=30)
        seen += [r.stdout, r.stderr]
    for p in (refused, unreachable):
        p.proc.send_signal(signal.SIGTERM)
        p.proc.wait(15)
        seen.append(p.log())
    assert "POST /v1/responses" in seen[-1] and "POST /v1/responses" in seen[-2]  # the access lines were looked at
    assert "unavailable" in seen[-1] and "unavailable" in seen[-2]
    for text in seen:
        assert wrong not in text


def test_a_store_that_accepts_but_never_answers_holds_no_request(store, serve):
    """redis-server stopped with SIGSTOP: the kernel still accepts connections, nothing answers (what
    a partition or a hung store looks like). Every call gives up within its timeout: open serves,
    closed answers 503, both at once; after SIGCONT both use the store again."""
    opened = serve("--state", store.url)
    closed = serve("--state", store.url, "--state-failure", "closed")
    assert store.proc is not None
    with httpx.Client(timeout=10) as c:
        for p in (opened, closed):
            assert c.post(f"{p.base}/v1/completions", json=COMPLETION, headers=auth(CAROL)).status_code == 200
        store.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                for p, want in ((opened, 200), (closed, 503)):
                    for method, path, body in (("POST", "/v1/completions", COMPLETION), ("GET", "/v1/usage", None),
                                               ("POST", "/v1/responses", {"model": "q", "input": "hi"})):
                        started = time.monotonic()
                        r = c.request(method, f"{p.base}{path}", json=body, headers=auth(CAROL))
                        assert r.status_code == want, r.text
                        assert time.monotonic() - started < 2.5, f"{path} waited on a store that does not answer"
                time.sleep(0.5)
        finally:
            store.proc.send_signal(signal.SIGCONT)
        _both_back(c, opened, closed, "after SIGCONT")


def test_tokens_per_day_in_the_store_refuses_until_the_day_ends(store, tmp_path: Path):
    """tokens_per_day counted in the store: the 429 names it and its Retry-After is the seconds to the
    store's UTC midnight (more than a minute away here: the store's clock is moved to noon)."""
    from proxy.errors import Overloaded

    (tmp_path / "keys.yaml").write_text(f"keys:\n  - name: erin\n    key: {ALICE}\n    tokens_per_day: 10\n")
    keys = load_keys(tmp_path / "keys.yaml")
    now = int(store.client().time()[0])
    store.client().set("llmproxy:clock", 43_200 - now % 86_400)  # 12:00 UTC in the store's clock
    state = State(store.url)

    async def run() -> Overloaded:
        await state.admit(keys[0])
        await state.charge("erin", 4, 8)  # 12 of 10: the answer overshot by its own tokens
        with pytest.raises(Overloaded) as err:
            await state.admit(keys[0])
        await state.redis.aclose()
        return err.value

    refused = asyncio.run(run())
    assert "tokens_per_day quota (12 of 10 used in this day)" in refused.message
    assert 43_000 <= int(refused.headers["retry-after"]) <= 43_200

