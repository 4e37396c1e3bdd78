"""Prompt rendering cost per template: µs per render, plain turns and a tool loop.

    .venv/bin/python bench/templates.py

CPU only, no network; each case runs a fixed number of renders.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.adapters.core_types import ChatRequest  # noqa: E402
from proxy.adapters.templates import load_template  # noqa: E402

RUNS = 3000
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CASES = {
    "plain": ([{"role": "system", "content": "You are helpful."},
               {"role": "user", "content": "Write a haiku about the sea."}], None),
    "tool loop": ([{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "a", "content": "21"}], [WEATHER]),
}
TEMPLATES = ["chatml", "qwen2.5", "qwen3", str(ROOT / "tests/data/qwen3.jinja"),
             str(ROOT / "tests/data/llama-3.1-instruct/tokenizer_config.json")]


def main() -> None:
    for name in TEMPLATES:
        template = load_template(name)
        for case, (messages, tools) in CASES.items():
            parsed = msgspec.convert({"messages": messages}, ChatRequest).messages
            seconds = min(timeit.repeat(lambda: template.render(parsed, tools), number=RUNS, repeat=3))
            print(f"{Path(name).name:24s} {case:10s} {seconds / RUNS * 1e6:8.1f} µs")


if __name__ == "__main__":
    main()
