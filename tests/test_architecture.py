"""The package's import graph: no cycles (counting imports inside functions
too), and the leaves stay leaves (the schema imports nothing of ktsft; the
adapter files module only the schema and the array/validation helpers)."""
import ast
import os

import ktsft

PKG = os.path.dirname(ktsft.__file__)


def import_graph():
    """{module: set of ktsft modules it imports anywhere in its source}."""
    mods = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                mods[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    graph = {}
    for m, path in mods.items():
        pkg = m.split(".") if path.endswith("__init__.py") else m.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - (node.level - 1)] if node.level else []
                tgt = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{tgt}.{a.name}"
                    deps.add(full if full in mods else tgt)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_import_cycles():
    g = import_graph()
    assert len(g) > 30  # the walk found the package
    on_cycle = sorted(m for m in g if m in _reach(g, m))
    assert on_cycle == [], f"modules on an import cycle: {on_cycle}"


def test_leaves():
    g = import_graph()
    assert g["ktsft.schema"] == set()
    assert g["ktsft.adapters"] <= {"ktsft.schema", "ktsft._arrays", "ktsft.validation"}
    assert "ktsft.distributed.expert_parallel" not in g["ktsft.distributed.shards"]
