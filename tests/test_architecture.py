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


def test_typed_cache_is_cimportable(tmp_path):
    """moe_sft.pxd declares the kernels' cache entry and workspace: another
    Cython module can cimport them and read their typed memory."""
    import subprocess
    import sys

    src = tmp_path / "user.pyx"
    src.write_text(
        "# cython: language_level=3\n"
        "from ktsft._kernels.moe_sft cimport CacheEntry, Workspace\n"
        "def rows(CacheEntry e, Workspace w):\n"
        "    return e.G.shape[0], e.T, w.H\n")
    root = os.path.dirname(PKG)
    r = subprocess.run([sys.executable, "-m", "cython", "-I", root, str(src), "-o",
                        str(tmp_path / "user.c")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "user.c").stat().st_size > 1000


def test_cache_entry_is_the_kernels_own_type():
    from ktsft import buffers
    from ktsft._kernels import moe_sft

    assert buffers.CacheEntry is moe_sft.CacheEntry and buffers.Workspace is moe_sft.Workspace
    e = buffers.CacheEntry(5, 4, 16, 8, 2, 3)
    assert e.arrays["G"].shape == (10, 8) and e.resize(3).arrays["x"].shape == (3, 16)
    try:
        e.T = 4  # the token count is the entry's, set by resize only
    except AttributeError:
        pass
    else:
        raise AssertionError("CacheEntry.T is assignable")
