# llmproxy tasks. Each recipe installs what it needs into ./.venv first.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv / "bin/python"

# List the recipes.
default:
    @just --list

# Create ./.venv and install llmproxy with its dev tools (skipped when up to date).
install: (_venv ".[dev]" ".stamp")

# Only what serving needs (`pip install -e .`): `serve` and `check` use this.
install-runtime: (_venv "." ".stamp-runtime" ".stamp-demo" ".stamp")

# The runtime plus the official clients the demo talks through (the `demo` extra).
install-demo: (_venv ".[demo]" ".stamp-demo" ".stamp")

# pip-install llmproxy (SPEC: ".", ".[demo]", ".[dev]") into ./.venv unless a stamp of an install
# that covers it (STAMPS; each install has its own) is newer than pyproject.toml; then stamp it.
_venv spec +stamps:
    @test -x {{py}} || python3 -m venv {{venv}}
    @set -- {{stamps}}; for s in "$@"; do [ {{venv}}/$s -nt pyproject.toml ] && exit 0; done; \
        {{py}} -m pip install -q --disable-pip-version-check -e '{{spec}}' && touch {{venv}}/$1

# Run the test suite (unit + loopback integration; the real-engine tests are `just test-engine`). The shared-state
# tests need a real redis-server.
test *ARGS: install
    @command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] \
        || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
        || echo "redis-server could not be installed: tests/test_state.py's Redis tests will be skipped"
    {{py}} -m pytest --ignore=tests/engine {{ARGS}}

# Test against llama.cpp's own llama-server: builds it once (~10-15 min on 2 cores, cached in ~/.cache/llmproxy/engine).
test-engine *ARGS: install
    PYTHON={{py}} tests/engine/build.sh >/dev/null
    {{py}} -m pytest tests/engine {{ARGS}}

# Start the mock upstream and the proxy on loopback, send one chat request, stream the answer.
demo: install-demo
    {{py}} -m proxy.demo

# Serve for real: routes from ./routes.d (QWEN_BASE_URL names the upstream).
serve *ARGS: install-runtime
    {{venv}}/bin/llmproxy serve {{ARGS}}

# Validate routes.d and print the route table.
check *ARGS: install-runtime
    {{venv}}/bin/llmproxy check {{ARGS}}

# Benchmark: mock upstream direct vs through the proxy on loopback (bench/README.md). ARGS: --quick, --seconds N, --profile, --scale, --fleet.
bench *ARGS: install
    @command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } \
        || echo "wrk could not be installed: non-stream load falls back to the asyncio client"
    @if [[ " {{ARGS}} " == *" --profile "* ]] && [ ! -x {{venv}}/bin/py-spy ]; then \
        {{py}} -m pip install -q --disable-pip-version-check -e '.[dev,bench]'; fi
    {{py}} bench/run.py {{ARGS}}
