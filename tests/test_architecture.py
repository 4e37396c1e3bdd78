"""The package's shape: imports run one way, and the wheel holds every module."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PROXY.rglob("*.py"):
        parts = path.relative_to(PROXY.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _runtime_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports when it runs: module level and inside functions
    (a lazy import that dodges a cycle is still a cycle), not under `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                for c in child.orelse:
                    visit_one(c)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level > 1:
                base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            subs = [f"{prefix}.{a.name}" for a in node.names]
            # `from pkg import submodule` needs the submodule; the package itself only for its own names
            targets = [s for s in subs if s in modules] + ([prefix] if any(s not in modules for s in subs) else [])
        else:
            visit(node)
            return
        for t in targets:
            m = owner(t)
            if m is not None and m != name:
                found.add(m)
                # Importing `proxy.adapters.x` runs `proxy/adapters/__init__.py` first, unless the
                # importer is inside that package already (then it is loaded, or loading it).
                parent = m.rpartition(".")[0]
                while parent in modules and not name.startswith(parent + ".") and parent != name:
                    found.add(parent)
                    parent = parent.rpartition(".")[0]

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (`a -> b -> a`), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := dfs(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := dfs(v)):
            return found
    return None


def test_no_runtime_import_cycle():
    """Every runtime import in proxy/ points down: a module never needs, even lazily, one that needs it."""
    modules = _modules()
    graph = {name: _runtime_imports(name, path, modules) for name, path in modules.items()}
    assert "proxy.routes" in graph["proxy.catalog"]  # the parser sees the imports at all
    cycle = _cycle(graph)
    assert cycle is None, "runtime import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_lazy_imports():
    graph = {"a": {"b"}, "b": {"a"}}
    assert _cycle(graph) == ["a", "b", "a"]


def test_every_call_hook_is_declared_with_a_default():
    """The forwarder, metrics, tracer and route table ask a call or adapter only what the
    protocol declares, and every optional member has its default on the base a face subclasses."""
    from proxy.adapters.call import Adapter, AdapterBase, Call, CallBase

    def members(proto: type) -> set[str]:
        return {n for n in (*proto.__annotations__, *vars(proto)) if not n.startswith("_")}

    assert members(Call) - {"body", "translates", "stream", "response", "events"} <= set(dir(CallBase))
    assert members(Adapter) - {"request"} <= set(dir(AdapterBase))
    lookups = [
        f"{path.name}: {line.strip()}"
        for path in PROXY.rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.search(r"getattr\((self\.)?(exchange\.)?(call|adapter)\b", line)
    ]
    assert lookups == []


def _readme() -> str:
    return (PROXY.parent / "README.md").read_text(encoding="utf-8")


def test_the_readme_dialect_table_lists_exactly_the_dialect_table():
    from proxy.adapters.dialects import FACTS

    header = next(line for line in _readme().splitlines() if line.startswith("| | `vllm`"))
    assert re.findall(r"`([^`]+)`", header) == list(FACTS)


def test_the_readme_route_file_table_lists_exactly_the_adapter_table():
    from proxy.adapters.registry import ADAPTERS

    row = next(line for line in _readme().splitlines() if line.startswith("| `adapter` |"))
    named = re.findall(r"`([a-z-]+)`", row.split("|")[3])
    assert sorted(set(named)) == sorted(ADAPTERS)


def test_the_cli_loads_without_the_metrics():
    """`serve` must choose prometheus-client's mode (PROMETHEUS_MULTIPROC_DIR with workers) before
    `observe` is imported; the CLI module and its parser (dialect names included) must not import it."""
    code = "import sys, proxy.cli; proxy.cli._parser(); print('proxy.observe' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_wheel_holds_every_module(tmp_path):
    """Built offline from this tree, the wheel has every module of proxy/ (and the built-in
    templates), and each imports from the wheel alone: a folder missing from pyproject.toml's
    package list fails here."""
    src = tmp_path / "src"  # a clean copy: setuptools builds in the tree and would reuse a stale build/
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROXY.parent / name, src / name)
    shutil.copytree(PROXY, src / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("llmproxy-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "proxy" / "adapters" / "qwen3.jinja").is_file()
    names = sorted(n for n in _modules() if n != "proxy.__main__")  # __main__ runs the CLI
    code = (
        "import importlib, sys; sys.path.insert(0, sys.argv[1]); names = sys.argv[2:]\n"
        "for n in names:\n"
        "    m = importlib.import_module(n)\n"
        "    assert m.__file__.startswith(sys.argv[1]), (n, m.__file__)\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(site), *names], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(names))


def test_the_readme_layout_names_every_module_and_only_those():
    section = _readme().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `proxy/"):
            continue
        cell = row.split(" | ")[0].lstrip("| ")
        first, *rest = re.findall(r"`([^`]+)`", cell)
        folder = first.rpartition("/")[0]
        named |= {first, *(f"{folder}/{name}" for name in rest)}
    on_disk = {str(p.relative_to(PROXY.parent)) for p in PROXY.rglob("*") if p.suffix in (".py", ".jinja")}
    on_disk -= {"proxy/__init__.py", "proxy/__main__.py", "proxy/adapters/__init__.py"}
    assert named == on_disk
