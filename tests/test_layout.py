"""The layout a newcomer reads: no import cycles between fastserve's modules (lazy and type-only imports
included), and the verb modules (`python -m fastserve.<verb>`) do not hide the API functions of the same name."""
import ast
import os
import subprocess
import sys

import fastserve

PACKAGE_DIR = os.path.dirname(fastserve.__file__)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    """module → the fastserve modules it imports anywhere in its body (top level, functions, TYPE_CHECKING)."""
    modules = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                modules[module_name(os.path.join(root, f))] = os.path.join(root, f)
    graph = {}
    for name, path in modules.items():
        deps = set()
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_between_modules():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a dependency of those modules on it
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    assert len(graph) > 40
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_verb_modules_keep_the_api_functions_callable():
    code = ("import fastserve.train, fastserve.evaluate, fastserve.export, fastserve.compress, fastserve.generate\n"
            "import fastserve\n"
            "assert all(callable(getattr(fastserve, v)) for v in ('train', 'evaluate', 'export', 'compress'))\n"
            "from fastserve.core.checkpoint import CheckpointError\n"
            "try:\n"
            "    fastserve.evaluate(None, 'train.workdir=/nonexistent/fastserve-run')\n"
            "except CheckpointError as e:\n"
            "    print('evaluated:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "evaluated: no checkpoint in /nonexistent/fastserve-run" in out.stdout
