"""NUMA pools (threadpool_count > 1, ktsft/_numa.py): the topology and the
pools made from it, bitwise the same results for any pool and thread
count, threads pinned to their pool's CPUs and the caller's affinity left
as it was, and the weights' pages on their pool's node."""
import os

import numpy as np
import pytest

import ktsft
from ktsft import _numa
from conftest import Problem

ALLOWED = sorted(os.sched_getaffinity(0))


def test_parse_cpulist():
    assert _numa.parse_cpulist("0-3,8,10-11\n", "x") == [0, 1, 2, 3, 8, 10, 11]
    assert _numa.parse_cpulist("", "x") == []
    for bad in ("0-", "3-1", "a", "1,,x"):
        with pytest.raises(ValueError, match="x: .* is not a CPU list"):
            _numa.parse_cpulist(bad, "x")


def _fake_sys(tmp_path, nodes):
    for n, text in nodes.items():
        d = tmp_path / f"node{n}"
        d.mkdir()
        (d / "cpulist").write_text(text + "\n")
    (tmp_path / "possible").write_text("0-1\n")  # not a node: ignored
    return str(tmp_path)


def test_topology_from_sysfs(tmp_path):
    root = _fake_sys(tmp_path, {0: "0-3", 1: "4-7", 2: ""})  # node 2: memory only
    assert _numa.system_nodes(root) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: []}
    assert _numa.topology({}, root, allowed=range(8)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # CPUs the process may not use are left out, and a node without any
    assert _numa.topology({}, root, allowed=[1, 2]) == [[1, 2]]
    assert _numa.topology({}, str(tmp_path / "none"), allowed=[0, 5]) == [[0, 5]]


def test_topology_model_from_env():
    env = {_numa.ENV: "0-1; 2-3;"}
    assert _numa.topology(env, allowed=range(4)) == [[0, 1], [2, 3]]
    for bad, msg in (("0-3;2-5", "CPU 2 is in two nodes"), (";", "no node"),
                     ("0-x", "not a CPU list")):
        with pytest.raises(ValueError, match=f"{_numa.ENV}.*{msg}"):
            _numa.topology({_numa.ENV: bad}, allowed=range(8))


@pytest.mark.parametrize("count, nodes, want", [
    (2, [[0, 1], [2, 3]], [[0, 1], [2, 3]]),                 # a pool per node
    (4, [[0, 1], [2, 3]], [[0], [1], [2], [3]]),             # each node halved
    (1, [[0, 1], [2, 3]], [[0, 1, 2, 3]]),                   # nodes grouped
    (2, [[0], [1], [2], [3]], [[0, 1], [2, 3]]),
    (3, [[0, 1], [2, 3]], [[0], [1], [2, 3]]),               # runs in node order
    (4, [[0, 1]], [[0], [0], [1], [1]]),                     # more pools than CPUs
])
def test_pool_cpus(count, nodes, want):
    assert _numa.pool_cpus(count, nodes) == want


def test_slot_pools():
    for E, P in ((8, 2), (7, 3), (128, 4), (5, 5)):
        sp = _numa.slot_pools(E, P)
        assert np.all(np.diff(sp) >= 0) and sp[0] == 0 and sp[-1] == P - 1
        sizes = np.bincount(sp, minlength=P)
        assert sizes.max() - sizes.min() <= 1


def test_bad_topology_model_named_by_the_constructor(monkeypatch):
    monkeypatch.setenv(_numa.ENV, "0-3;3-5")
    with pytest.raises(ValueError, match=f"{_numa.ENV}=.*CPU 3 is in two nodes"):
        Problem(E=4).wrapper(threadpool_count=2)
    Problem(E=4).wrapper(threadpool_count=1)  # one pool reads no topology


def test_more_pools_than_experts():
    with pytest.raises(ValueError, match="threadpool_count=6: more pools than num_experts=5"):
        Problem(E=5).wrapper(threadpool_count=6)


@pytest.mark.parametrize("pools, threads", [(2, 2), (2, 5), (3, 4), (5, 2)])
def test_pools_change_no_bits(isa, dtype, pools, threads, monkeypatch):
    """Who runs a task never changes its bits: every output and gradient is
    identical with any pool and thread count, skewed routing included."""
    monkeypatch.setenv(_numa.ENV, ";".join(str(c) for c in ALLOWED))  # a node per CPU
    p = Problem(T=45, H=67, I=45, E=6, k=3, r=3, seed=31, routing="skewed")
    base = p.run(p.wrapper(dtype=dtype, isa=isa, threads=1))
    got = p.run(p.wrapper(dtype=dtype, isa=isa, threads=threads, threadpool_count=pools))
    for name, ref in base.items():
        assert np.array_equal(got[name], ref), f"{name}: {pools} pools, {threads} threads"


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_pools_quantized_and_dropout(dtype):
    p = Problem(T=40, H=64, I=96, E=6, k=2, r=4, seed=3, routing="skewed")
    runs = []
    for pools, threads in ((1, 1), (3, 4)):
        m = p.wrapper(dtype=dtype, threads=threads, threadpool_count=pools, lora_dropout=0.2)
        out = m.forward_sft(p.x, p.ids, p.w, dropout_seed=9)
        dx, g = m.backward(p.dO)
        # accumulation: a second step added to the first's gradients
        g = {n: np.array(v) for n, v in g.items() if n != "grad_routing_weights"}
        m.forward_sft(p.x[::-1].copy(), p.ids, p.w, dropout_seed=10)
        m.backward(p.dO, grads_out=g, accumulate=True)
        runs.append([np.array(out), np.array(dx), *[g[n] for n in sorted(g)]])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_callers_affinity_left_as_it_was():
    """A call pins its threads to their pools and then restores them: the
    calling thread keeps its own affinity, a restricted one included."""
    p = Problem(T=20, E=4)
    m = p.wrapper(threads=3, threadpool_count=2)
    before = os.sched_getaffinity(0)
    p.run(m)
    assert os.sched_getaffinity(0) == before
    os.sched_setaffinity(0, {ALLOWED[-1]})
    try:
        got = p.run(m)
        assert os.sched_getaffinity(0) == {ALLOWED[-1]}
    finally:
        os.sched_setaffinity(0, before)
    base = p.run(p.wrapper(threads=1))
    for name in base:
        assert np.array_equal(got[name], base[name])


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs")
def test_threads_run_on_their_pools_cpus(monkeypatch):
    monkeypatch.setenv(_numa.ENV, f"{ALLOWED[0]};{ALLOWED[1]}")
    m = Problem(E=4).wrapper(threads=4, threadpool_count=2)
    assert [pool["cpus"] for pool in m.numa_info()["pools"]] == [[ALLOWED[0]], [ALLOWED[1]]]
    got = m._kernel.pool_probe(4)
    assert sorted(got) == [(0, ALLOWED[0])] * 2 + [(1, ALLOWED[1])] * 2
    assert os.sched_getaffinity(0) == set(ALLOWED)


def test_stolen_tasks_counted():
    """A pool without threads (one thread, two pools) has its tasks run by
    the other's: every task of pool 1's experts is counted as stolen."""
    p = Problem(T=30, E=4, k=1)
    p.ids = np.full((p.T, 1), 3)  # slot 3: pool 1
    m = p.wrapper(threads=1, threadpool_count=2)
    p.run(m)
    stolen = m.numa_info()["stolen_tasks"]
    assert stolen["forward"] > 0 and stolen["backward"] > 0
    p.ids = np.full((p.T, 1), 0)  # pool 0: the thread's own
    p.run(m)
    assert m.numa_info()["stolen_tasks"] == {"forward": 0, "backward": 0}
    one = p.wrapper(threads=2)
    p.run(one)
    assert one.numa_info() == {"threadpool_count": 1, "stolen_tasks": {"forward": 0,
                                                                       "backward": 0},
                               "pools": one.numa_info()["pools"]}


def _on_node(info):
    for pool in info["pools"]:
        if pool["pages"] is None:
            pytest.skip("the kernel does not report page nodes here (move_pages)")
        assert pool["pages"] > 0
        assert pool["pages_on_node"] == pool["pages"], pool


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_weights_first_touched_on_their_pools_node(tmp_path, dtype):
    """Weights ktsft stores (read from a file, converted, quantized) are
    first touched by the loading thread pinned to their slot's pool: every
    page on that pool's node (here the nodes this machine has)."""
    p = Problem(E=4, H=256, I=512)
    path = str(tmp_path / "layer.safetensors")
    p.wrapper(dtype=dtype).save_weights(path)
    m = ktsft.SFTMoEWrapper(0, 4, 3, 256, 512, threadpool_count=2, weight_path=path,
                            lora_rank=3, lora_alpha=p.alpha, dtype=dtype)
    before = os.sched_getaffinity(0)
    m.load_weights()
    assert os.sched_getaffinity(0) == before
    _on_node(m.numa_info())
    # the same bits as a layer of one pool
    m.init_lora_weights(*p.lora)
    got, want = p.run(m), p.run(p.wrapper(dtype=dtype))
    for name in want:
        assert np.array_equal(got[name], want[name])


def test_in_place_weights_moved_to_their_pools_node():
    """Arrays used in place are the caller's memory: their pages are moved
    (move_pages, same addresses) instead of copied."""
    p = Problem(E=4, H=256, I=512)
    m = p.wrapper(dtype="fp32", threadpool_count=2)
    assert m.stored_weights().gate.__array_interface__["data"][0] == \
        p.gate_proj.__array_interface__["data"][0]  # still the caller's array
    _on_node(m.numa_info())


def test_page_nodes_of_a_buffer():
    a = np.ones(3 * os.sysconf("SC_PAGE_SIZE") // 8 + 5)
    got = _numa.page_nodes(a)
    if got is None:
        pytest.skip("move_pages is not available here")
    assert got.size in (4, 5) and np.all(got >= 0)
    assert _numa.page_nodes(a[:0]).size == 0
    assert np.array_equal(_numa.page_nodes(a[::-1]), got)


def test_torch_module_with_pools():
    """LoRAExperts(threadpool_count=2) computes what one pool computes, and
    a deep copy keeps its pools."""
    import copy

    torch = pytest.importorskip("torch")
    from ktsft.torch import LoRAExperts

    p = Problem(T=17, H=64, I=48, E=4, k=2, r=4, seed=5)
    res = []
    for pools in (1, 2):
        m = LoRAExperts(4, 2, 64, 48, r=4, dtype="fp32", threads=3, threadpool_count=pools)
        m.load_weights(p.gate_proj, p.up_proj, p.down_proj)
        with torch.no_grad():
            for prm in m.parameters():
                prm.copy_(torch.linspace(-0.1, 0.1, prm.numel()).view_as(prm))
        if pools == 2:
            m = copy.deepcopy(m)
            assert m.wrapper.threadpool_count == 2
        x = torch.from_numpy(p.x).requires_grad_(True)
        y = m(x, torch.from_numpy(p.ids), torch.from_numpy(p.w))
        (y * torch.from_numpy(p.x)).sum().backward()
        res.append([y.detach(), x.grad] + [prm.grad for prm in m.parameters()])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_set_pools_checks_and_copies():
    """The native layer checks the pools it is given and keeps its own copy
    of the slots' pools: changing the array afterwards changes nothing."""
    p = Problem(T=25, E=4)
    m = p.wrapper(threads=2)
    k = m._kernel
    cpus, offs = np.array([0, 0], np.int32), np.array([0, 1, 2], np.int32)
    for sp, msg in ((np.array([0, 0, 1, 2], np.int32), r"slot_pool\[3\] = 2: not a pool"),
                    (np.array([0, 0, 1, -1], np.int32), r"slot_pool\[3\] = -1")):
        with pytest.raises(ValueError, match=msg):
            k.set_pools(sp, cpus, offs)
    with pytest.raises(ValueError, match="cpu_offs"):
        k.set_pools(np.zeros(4, np.int32), cpus[:1], np.array([0, 2, 1], np.int32))
    with pytest.raises(ValueError, match="5 pools for 4 experts"):
        k.set_pools(np.zeros(4, np.int32), cpus, np.zeros(6, np.int32))
    want = p.run(m)
    sp = np.array([0, 0, 1, 1], np.int32)
    k.set_pools(sp, cpus, offs)
    sp[:] = 1000  # would index far outside the pools if it were read
    got = p.run(m)
    for name in want:
        assert np.array_equal(got[name], want[name])


def test_bench_numa_rows():
    """bench/numa.py's rows: one per token and pool count, times relative
    to one pool, pages on their node."""
    from bench import numa

    lines = []
    rows = numa.run("tiny", [9], 2, [1, 2], 1, out=lines.append)
    assert lines[0].startswith("nodes")
    assert [(r["T"], r["pools"]) for r in rows] == [(9, 1), (9, 2)]
    assert rows[0]["vs_one_pool"] == 1.0 and rows[1]["step_ms"] > 0
    assert rows[0]["stolen_tasks"] == 0
    assert all(r["pages_on_node"] in (None, 1.0) for r in rows)
