"""`balance:` over a fake fleet: real mock upstreams on loopback behind the proxy."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.balance import BLOCK, POLICIES, Tips, block_hashes
from proxy.config import ConfigError, load_file
from proxy.upstreams import Pool
from servers import MockServer, free_port, run_mock

SYSTEM = "You are a careful coding agent. " * 200  # ~6 KiB shared by every conversation


@pytest.fixture
def fleet() -> Iterator[list[MockServer]]:
    with run_mock() as a, run_mock() as b, run_mock() as c:
        yield [a, b, c]


def route(fleet: list[MockServer], path: str = "/v1/completions", **extra: str) -> str:
    ups = ", ".join(f"{m.url}/v1/completions" for m in fleet)
    lines = "".join(f"\n        {k}: {v}" for k, v in extra.items())
    return f"""
        path: {path}
        upstream: [{ups}]{lines}
    """


def served(fleet: list[MockServer], marker: str) -> list[int]:
    """Which fleet member got each request whose body contains `marker`, in order of arrival there."""
    return sorted({i for i, m in enumerate(fleet) for r in m.requests if marker in r.body})


def access(caplog: pytest.LogCaptureFixture, count: int) -> list[dict]:
    """The access lines, once `count` are there: the proxy writes a request's line after its last
    byte went out (observe.finish, in the Exchange's `finally`), so the client can hold the answer
    while the proxy's thread has not written it yet."""
    deadline = time.monotonic() + 10
    while len(lines := [r for r in caplog.records if r.name == "llmproxy.access"]) < count:
        assert time.monotonic() < deadline, f"{len(lines)} access lines, not {count}"
        time.sleep(0.01)
    return [json.loads(_encode(r.msg)) for r in lines]


def _encode(rec: object) -> bytes:
    import msgspec

    return msgspec.json.encode(rec)


def turns(conv: str, n: int) -> list[str]:
    """The prompts of `n` turns of one conversation: each resends all before it, plus ~2 KiB."""
    out, text = [], SYSTEM + f"[conversation {conv}] "
    for k in range(n):
        text += f"turn {k} of {conv}: " + "more context, " * 150
        out.append(text)
    return out


def test_prefix_keeps_each_conversation_on_one_upstream(fleet, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    base = proxy_for(routes_dir(r=route(fleet, balance="prefix")))
    convs = {c: turns(c, 4) for c in ("alpha", "beta", "gamma")}
    for k in range(4):  # interleaved, as agent sessions are
        for c, prompts in convs.items():
            r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": prompts[k]}, timeout=10)
            assert r.status_code == 200, r.text
    homes = {c: served(fleet, f"[conversation {c}]") for c in convs}
    assert all(len(h) == 1 for h in homes.values()), homes  # every turn met the upstream of its first
    assert sorted(h[0] for h in homes.values()) == [0, 1, 2]  # new conversations spread over the fleet
    choices = [rec["choice"] for rec in access(caplog, 12)]
    assert choices[:3] == ["least-busy"] * 3 and choices[3:] == ["affinity"] * 9


def test_round_robin_stays_the_default_and_scatters_turns(fleet, routes_dir, proxy_for):
    base = proxy_for(routes_dir(r=route(fleet)))
    for prompt in turns("solo", 3):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": prompt}, timeout=10).status_code == 200
    assert served(fleet, "[conversation solo]") == [0, 1, 2]


def test_prefix_on_a_chat_route_keys_on_the_rendered_prompt(fleet, routes_dir, proxy_for):
    base = proxy_for(routes_dir(r=route(fleet, path="/v1/chat/completions", adapter="chat-to-completions",
                                        balance="prefix")))
    for conv in ("one", "two"):
        messages = [{"role": "system", "content": SYSTEM}]
        for k in range(3):
            messages.append({"role": "user", "content": f"{conv} asks {k}: " + "details " * 300})
            r = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=10)
            assert r.status_code == 200, r.text
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    one, two = served(fleet, "one asks 0"), served(fleet, "two asks 0")
    assert len(one) == 1 and len(two) == 1 and one != two


def test_passthrough_messages_are_hashed_as_sent(fleet, routes_dir, proxy_for):
    """A passthrough chat body: its `messages`, serialised in order, is the prompt."""
    base = proxy_for(routes_dir(r=route(fleet, balance="prefix")))
    messages = [{"role": "system", "content": SYSTEM}]
    for k in range(4):
        messages.append({"role": "user", "content": f"msgs turn {k} " + "x " * 600})
        r = httpx.post(f"{base}/v1/completions", json={"model": "m", "messages": messages}, timeout=10)
        assert r.status_code == 200
    assert len(served(fleet, "msgs turn 0")) == 1


def _held(base: str, prompt: str, key: str, headers: dict[str, str] | None = None) -> threading.Thread:
    """A stream the mock holds open after its first event (until released): one request in flight."""

    def go() -> None:
        with httpx.stream("POST", f"{base}/v1/completions", json={"prompt": prompt, "stream": True},
                          headers={"x-mock-hold": key, **(headers or {})}, timeout=20) as r:
            r.read()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _wait(pred, what: str) -> None:
    deadline = time.monotonic() + 10
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_guard_spills_a_busy_conversation_to_the_least_busy(fleet, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    a, b = fleet[:2]
    base = proxy_for(routes_dir(r=route([a, b], balance="{policy: prefix, spill_margin: 1}")))
    prompts = turns("hot", 5)
    assert httpx.post(f"{base}/v1/completions", json={"prompt": prompts[0]}, timeout=10).status_code == 200
    home = a if served([a, b], "[conversation hot]") == [0] else b
    threads = []
    for k in (1, 2):  # two turns held in flight at home: 2 - 0 > margin 1 for the next one
        threads.append(_held(base, prompts[k], f"h{k}"))
        _wait(lambda k=k: len(home.requests) == k + 1, "the held turn reached its home")
    r = httpx.post(f"{base}/v1/completions", json={"prompt": prompts[3]}, timeout=10)
    assert r.status_code == 200
    other = b if home is a else a
    assert any("turn 3 of hot" in q.body for q in other.requests)  # spilled
    for k in (1, 2):
        home.release(f"h{k}")
    for t in threads:
        t.join(10)
    # the spilled turn left the longest prefix on the other upstream: the next turn follows it
    assert httpx.post(f"{base}/v1/completions", json={"prompt": prompts[4]}, timeout=10).status_code == 200
    assert any("turn 4 of hot" in q.body for q in other.requests)
    choices = [rec["choice"] for rec in access(caplog, 5)]
    assert choices.count("spill") == 1 and choices[-1] == "affinity"
    metrics = httpx.get(f"{base}/metrics").text
    assert f'llmproxy_upstream_choices_total{{reason="spill",route="r",upstream="{other.url}/v1/completions"}} 1.0' \
        in metrics


def test_least_busy_ties_go_in_turn_so_an_idle_fleet_is_evenly_used(fleet, routes_dir, proxy_for):
    """One request at a time: every upstream has 0 in flight, and the first is not favoured
    (LiteLLM's least-busy piles such traffic on its first server)."""
    base = proxy_for(routes_dir(r=route(fleet, balance="least-busy")))
    for _ in range(6):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
    assert [len(m.requests) for m in fleet] == [2, 2, 2]


def test_least_busy_avoids_the_upstream_with_requests_in_flight(fleet, routes_dir, proxy_for):
    a, b = fleet[:2]
    base = proxy_for(routes_dir(r=route([a, b], balance="least-busy")))
    t = _held(base, "long one", "lb")
    _wait(lambda: len(a.requests) + len(b.requests) == 1, "the held request arrived")
    busy = a if a.requests else b
    for _ in range(3):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "short"}, timeout=10).status_code == 200
    assert len(busy.requests) == 1  # all three went to the idle one
    busy.release("lb")
    t.join(10)


def test_a_down_upstream_is_skipped_and_its_conversations_move(upstream, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    dead = free_port()
    base = proxy_for(routes_dir(r=f"""
        path: /v1/completions
        upstream: [http://127.0.0.1:{dead}/v1/completions, {upstream.url}/v1/completions]
        balance: prefix
    """))
    for prompt in turns("moved", 3):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": prompt}, timeout=10)
        assert r.status_code == 200, r.text
    assert len(upstream.requests) == 3
    choices = [rec["choice"] for rec in access(caplog, 3)]
    assert choices[0] == "failover"  # the first try met the dead one, unknown yet
    assert choices[1:] == ["affinity", "affinity"]  # then it is skipped; the turns follow the failover


def test_session_header_sticks_a_session_to_one_upstream(fleet, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    base = proxy_for(routes_dir(r=route(fleet, balance="{policy: least-busy, session: {header: x-session-id}}")))
    for k in range(4):  # unrelated prompts, one session
        r = httpx.post(f"{base}/v1/completions", json={"prompt": f"q{k}"}, headers={"x-session-id": "s-1"})
        assert r.status_code == 200
    assert sum(1 for m in fleet if m.requests) == 1
    assert [rec["choice"] for rec in access(caplog, 4)] == ["session"] * 4


def test_a_session_new_to_a_process_goes_to_the_same_upstream_everywhere():
    """Rendezvous hashing: two workers (two pools) that never saw a session agree on its upstream,
    and taking one upstream down moves only the sessions it had."""
    from proxy.balance import Hint
    from proxy.config import Balance, Session

    config = Balance(policy="least-busy", session=Session(header="x-session-id"))
    urls = [f"http://127.0.0.1:{9000 + i}/v1/completions" for i in range(4)]  # never contacted
    one, two = Pool("r", urls, None, config), Pool("r", urls, None, config)
    homes = {}
    for s in range(200):
        a, why = one.balancer.choose(Hint((), f"s{s}"))
        b, _ = two.balancer.choose(Hint((), f"s{s}"))
        one.balancer.release(a)
        two.balancer.release(b)
        assert (a.url, why) == (b.url, "session")
        homes[f"s{s}"] = a.url
    assert 30 <= sum(1 for u in homes.values() if u == urls[0]) <= 70  # spread over the four
    three = Pool("r", urls, None, config)
    three.failed(three.members[0], "refused")
    for s, url in homes.items():
        m, _ = three.balancer.choose(Hint((), s))
        three.balancer.release(m)
        assert m.url == url or url == urls[0]


def test_session_from_body_fields(fleet, routes_dir, proxy_for):
    base = proxy_for(routes_dir(r=route(
        fleet, balance="{policy: round-robin, session: {fields: [prompt_cache_key, metadata.user_id]}}")))
    for k in range(3):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": f"p{k}", "metadata": {"user_id": "u7"}}
                          ).status_code == 200
    for k in range(3):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": f"k{k}", "prompt_cache_key": "pk"}
                          ).status_code == 200
    homes = [served(fleet, '"metadata"'), served(fleet, '"prompt_cache_key"')]
    assert [len(h) for h in homes] == [1, 1]


def test_tips_are_bounded_and_keep_the_recent_ones():
    pool = Pool("r", ["http://a", "http://b"])
    a, b = pool.members
    tips = Tips(capacity=64)
    for conv in range(1000):
        tips.add(block_hashes(f"conversation {conv} ".ljust(BLOCK * 10, "."))[-1], a)
        assert len(tips) <= 64
    recent = block_hashes("conversation 999 ".ljust(BLOCK * 10, ".") + " and the next turn " * 200)
    assert tips.find(recent, [a, b]) == (a, 9)  # it continues a 9-block prompt served by a
    assert tips.find(recent, [b]) == (None, 0)  # a is down: nothing to prefer
    old = block_hashes("conversation 0 ".ljust(BLOCK * 10, ".") + " and the next turn " * 200)
    assert tips.find(old, [a, b]) == (None, 0)  # long evicted


def test_block_hashes_name_prefixes():
    a = block_hashes("x" * (BLOCK * 3) + "a" * BLOCK + "!")
    b = block_hashes("x" * (BLOCK * 3) + "b" * BLOCK + "tail")
    assert a[:3] == b[:3] and a[3] != b[3] and len(b) == 4  # the partial tail is not a block
    assert block_hashes("y" * BLOCK) == []  # the last byte is never in a block (a `]` that the next turn changes)


def test_a_member_marked_down_forgets_what_it_served():
    from proxy.config import Balance

    pool = Pool("r", ["http://a", "http://b"], None, Balance(policy="prefix"))
    a, b = pool.members
    tips = pool.balancer.tips
    prompt = block_hashes("z" * BLOCK * 4)
    tips.add(prompt[-1], a)
    assert tips.find(prompt, [a, b]) == (a, 3)
    pool.failed(a, "refused")
    pool.succeeded(a)
    assert tips.find(prompt, [a, b]) == (None, 0)  # back up, but its engine may have restarted empty


def test_config_short_and_long_forms_and_errors(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("path: /v1/completions\nupstream: [http://127.0.0.1:1/v1/completions]\nbalance: prefix\n")
    assert load_file(f).balancing.policy == "prefix"
    f.write_text("path: /v1/completions\nupstream: http://127.0.0.1:1/v1/completions\nbalance: busiest\n")
    with pytest.raises(ConfigError) as e:
        load_file(f)
    assert "balance" in str(e.value) and all(repr(p) in str(e.value) for p in POLICIES)
    f.write_text("path: /v1/completions\nupstream: http://127.0.0.1:1/v1/completions\n"
                 "balance: {policy: nearest}\n")
    with pytest.raises(ConfigError) as e:
        load_file(f)
    assert "balance.policy" in str(e.value) and "'least-busy'" in str(e.value)
    f.write_text("path: /v1/completions\nupstream: http://127.0.0.1:1/v1/completions\n"
                 "balance: {policy: prefix, session: {}}\n")
    with pytest.raises(ConfigError, match="balance.session: name a `header` or `fields`"):
        load_file(f)
    f.write_text("path: /v1/completions\nupstream: http://127.0.0.1:1/v1/completions\n"
                 "balance: {policy: prefix, spill_margin: -1}\n")
    with pytest.raises(ConfigError, match="balance.spill_margin"):
        load_file(f)


def test_readme_documents_every_policy():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Upstream lists"):readme.index("### Hot reload")]
    assert all(f"`{p}`" in section for p in POLICIES)


def test_check_shows_the_policy(routes_dir, capsys):
    from proxy.cli import main as cli

    folder = routes_dir(m="""
        path: /v1/completions
        upstream: [http://127.0.0.1:1/v1/completions, http://127.0.0.1:2/v1/completions]
        balance: {policy: prefix, session: {header: x-session-id}}
    """)
    assert cli(["check", "--routes", str(folder)]) == 0
    assert "http://127.0.0.1:1/v1/completions (balance: prefix, session)" in capsys.readouterr().out


def test_every_upstream_out_by_health_checks_is_refused_by_every_policy():
    import math

    from proxy.balance import Hint
    from proxy.config import Balance, Health
    from proxy.errors import NoHealthyUpstream

    pool = Pool("r", ["http://127.0.0.1:1", "http://127.0.0.1:2"], Health(), Balance(policy="least-busy"))
    for m in pool.members:
        m.down_until = math.inf
    with pytest.raises(NoHealthyUpstream, match="every upstream of route 'r' is down"):
        pool.balancer.choose(Hint((), None))
    pool.members[1].down_until = 0.0
    assert pool.balancer.choose(Hint((), None)) == (pool.members[1], "least-busy")


def test_session_from_an_anthropic_body_on_a_messages_route(fleet, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    base = proxy_for(routes_dir(r=route(fleet, path="/v1/messages", adapter="messages-to-completions",
                                        balance="{policy: prefix, session: {fields: [metadata.user_id]}}")))
    for k in range(3):  # short, unrelated prompts: only the session ties them
        r = httpx.post(f"{base}/v1/messages", json={
            "model": "m", "max_tokens": 8, "metadata": {"user_id": "user-42"},
            "messages": [{"role": "user", "content": f"question {k}"}]}, timeout=10)
        assert r.status_code == 200, r.text
    assert sum(1 for m in fleet if m.requests) == 1
    assert [rec["choice"] for rec in access(caplog, 3)] == ["session"] * 3
