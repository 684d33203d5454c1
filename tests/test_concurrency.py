"""Threads and processes: the kernels release the GIL; two wrappers driven
from two Python threads at once give bitwise the results they give alone;
one wrapper used from two threads at once is serialized by its lock (or, for
a full cache, refused with a clear error), never corrupted; forking after
OpenMP has run and multiprocessing with spawn and fork.

Every subprocess runs under a timeout so that a hang fails the test instead
of stalling CI.
"""
import os
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import ktsft
from conftest import Problem, run_python

ISAS = ktsft.cpu_info()["runnable_isas"]
TESTS = os.path.dirname(os.path.abspath(__file__))
CHILD_TIMEOUT = 60


def _result(out, dx, grads):
    res = {"out": np.array(out, copy=True), "grad_input": np.array(dx, copy=True)}
    res.update({n: np.array(v, copy=True) for n, v in grads.items()})
    return res


def _assert_same(got, want, what=""):
    for n in want:
        assert np.array_equal(got[n], want[n]), f"{what}: {n} differs"


def _run_threads(targets):
    """Start every target at once (barrier); re-raise the first error."""
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread did not finish within 120 s"
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------
# the GIL
# ---------------------------------------------------------------------------
def test_kernels_release_the_gil():
    """While one thread runs long kernel calls, a pure-Python loop in the
    main thread keeps running.  The loop counts the wall time it covers in
    steps shorter than 2 ms: with the GIL held through the kernels it could
    only run in the few short Python windows around each call (a few
    percent of the time); with the GIL released it covers most of it."""
    p = Problem(T=768, H=512, I=384, E=2, k=2, r=4, seed=1)
    m = p.wrapper(isa=ISAS[0], threads=1)
    m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)     # warm up
    done = threading.Event()
    spans = []

    def work():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            m.forward_sft(p.x, p.ids, p.w)
            m.backward(p.dO)
        spans.append(time.perf_counter() - t0)
        done.set()

    worker = threading.Thread(target=work, daemon=True)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        worker.start()
        covered, last = 0.0, time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            if now - last < 0.002:
                covered += now - last
            last = now
        worker.join()
    finally:
        sys.setswitchinterval(old)
    frac = covered / spans[0]
    assert frac > 0.25, f"the main thread ran {frac:.0%} of the time the kernels ran: GIL held?"


# ---------------------------------------------------------------------------
# two wrappers, two threads
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [("fp32", "bf16"), ("bf16", "bf16")])
def test_two_wrappers_two_threads_bitwise(dtypes):
    """Different layers, ISAs and thread counts at once: each equals its solo run."""
    pa = Problem(T=37, H=70, I=50, E=5, k=2, r=4, seed=21)
    pb = Problem(T=23, H=48, I=90, E=6, k=3, r=3, seed=22, routing="skewed")
    ma = pa.wrapper(dtype=dtypes[0], isa=ISAS[-1], threads=2)
    mb = pb.wrapper(dtype=dtypes[1], isa=ISAS[len(ISAS) // 2], threads=1)
    want_a, want_b = pa.run(ma), pb.run(mb)
    got = {"a": [], "b": []}

    def loop(p, m, key):
        def run():
            for _ in range(8):
                got[key].append(p.run(m))
        return run

    _run_threads([loop(pa, ma, "a"), loop(pb, mb, "b")])
    assert len(got["a"]) == len(got["b"]) == 8
    for r in got["a"]:
        _assert_same(r, want_a, "wrapper a")
    for r in got["b"]:
        _assert_same(r, want_b, "wrapper b")


# ---------------------------------------------------------------------------
# one wrapper, two threads
# ---------------------------------------------------------------------------
def _grads_out(m):
    from ktsft.schema import lora_shapes

    return {n: np.zeros(s, np.float32) for n, s in lora_shapes(
        m.num_experts, m.hidden_size, m.moe_intermediate_size, m.lora_rank).items()}


def test_one_wrapper_two_threads_with_handles(dtype):
    """Two threads share one wrapper (depth 2): forwards and backwards
    interleave, the lock serializes every call, handles pair each backward
    with its own forward, grads_out keeps each thread's LoRA gradients its
    own.  Every result equals the solo run bitwise."""
    pa = Problem(T=19, H=40, I=24, E=4, k=2, r=3, seed=31)
    pb = Problem(T=11, H=40, I=24, E=4, k=2, r=3, seed=32)
    pb.gate_proj, pb.up_proj, pb.down_proj, pb.lora = pa.gate_proj, pa.up_proj, pa.down_proj, pa.lora
    m = pa.wrapper(dtype=dtype, threads=2, depth=2)
    want = {"a": pa.run(m), "b": pb.run(m)}
    got = {"a": [], "b": []}

    def loop(p, key):
        def run():
            mine = _grads_out(m)
            for _ in range(12):
                out, h = m.forward_sft(p.x, p.ids, p.w, return_handle=True)
                out = np.array(out, copy=True)
                time.sleep(0)          # let the other thread in between
                dx, grads = m.backward(p.dO, handle=h, grads_out=mine)
                got[key].append(_result(out, dx, grads))
        return run

    _run_threads([loop(pa, "a"), loop(pb, "b")])
    assert m.cache_depth == 0
    for key in ("a", "b"):
        assert len(got[key]) == 12
        for r in got[key]:
            _assert_same(r, want[key], f"thread {key}")


def test_one_wrapper_two_threads_full_cache_is_refused():
    """Depth 1 and no handles: while one thread's forward is cached, the
    other's forward is refused with a clear RuntimeError (retried here); no
    call ever returns a wrong result."""
    pa = Problem(T=15, H=32, I=24, E=4, k=2, r=2, seed=41)
    pb = Problem(T=15, H=32, I=24, E=4, k=2, r=2, seed=42)
    pb.gate_proj, pb.up_proj, pb.down_proj, pb.lora = pa.gate_proj, pa.up_proj, pa.down_proj, pa.lora
    m = pa.wrapper(threads=1, depth=1)
    want = {"a": pa.run(m), "b": pb.run(m)}
    got = {"a": 0, "b": 0}
    refused = []

    def loop(p, key):
        def run():
            mine = _grads_out(m)
            while got[key] < 10:
                try:
                    out = np.array(m.forward_sft(p.x, p.ids, p.w), copy=True)
                except RuntimeError as e:
                    assert "max_cache_depth" in str(e)
                    refused.append(key)
                    time.sleep(0.0005)
                    continue
                dx, grads = m.backward(p.dO, grads_out=mine)
                _assert_same(_result(out, dx, grads), want[key], f"thread {key}")
                got[key] += 1
        return run

    _run_threads([loop(pa, "a"), loop(pb, "b")])
    assert m.cache_depth == 0
    # refusals happen or not depending on the interleaving; either way the
    # results were all exact


def test_lock_serializes_calls():
    """A second thread's call waits while the first holds the wrapper's
    lock (the kernels run outside the GIL but inside the lock)."""
    p = Problem(T=9, H=24, I=16, E=3, k=2, r=2, seed=5)
    m = p.wrapper(threads=1)
    want = p.run(m)
    entered = threading.Event()
    result = {}

    def other():
        entered.set()
        result["r"] = p.run(m)

    with m._lock:
        t = threading.Thread(target=other, daemon=True)
        t.start()
        entered.wait(10)
        t.join(0.2)
        assert t.is_alive(), "forward_sft ran while another thread held the wrapper's lock"
    t.join(60)
    assert not t.is_alive()
    _assert_same(result["r"], want, "after the lock was released")


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
_PRELUDE = textwrap.dedent(f"""
    import os, sys, signal, time
    import numpy as np
    sys.path.insert(0, {TESTS!r})
    sys.path.insert(0, {os.path.dirname(TESTS)!r})  # ktsft built in place, not installed
    from conftest import Problem
    P = Problem(T=40, H=64, I=48, E=4, k=2, r=4, seed=1)

    def same(got, want):
        return all(np.array_equal(got[n], want[n]) for n in want)
""")


def _python(code, timeout=CHILD_TIMEOUT):
    return run_python(["-c", _PRELUDE + textwrap.dedent(code)], timeout)


_FORK = """
    want = P.run(P.wrapper(threads={parent}))          # OpenMP has run in the parent
    pid = os.fork()
    if pid == 0:
        ok = same(P.run(P.wrapper(threads={child})), want)
        os._exit(0 if ok else 1)
    deadline = time.time() + {wait}
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            print("child", "same" if code == 0 else f"exit {{code}}")
            sys.exit(code)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("child HUNG")
    sys.exit(3)
"""


@pytest.mark.parametrize("parent,child", [(1, 2), (2, 1)])
def test_fork_after_openmp_works(parent, child):
    """A forked child may use a new wrapper when either side stays on one
    thread: bitwise the parent's results."""
    r = _python(_FORK.format(parent=parent, child=child, wait=40))
    assert r.returncode == 0, r.stdout + r.stderr


def test_fork_after_parallel_openmp_multithreaded_child():
    """libgomp cannot run a parallel region in a child forked after the
    parent ran one: ktsft runs such a child on one thread, with a warning,
    and the results are still bitwise the parent's (thread-count agnostic)."""
    r = _python(_FORK.format(parent=2, child=2, wait=20))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "forked after OpenMP ran" in r.stderr


def test_fork_while_another_thread_holds_the_locks():
    """A parent thread inside a call (holding the wrapper's, the shared
    workspace's and the staging pool's locks) at the fork: the child, where
    that thread does not exist, still runs the same wrapper."""
    r = _python("""
        import threading
        from ktsft.buffers import KExpertsSFTBuffer
        m = P.wrapper(threads=1)
        want = P.run(m)
        held, release = threading.Event(), threading.Event()
        def hold():
            with m._lock, m.workspace.lock, KExpertsSFTBuffer._staging_lock:
                held.set()
                release.wait()
        t = threading.Thread(target=hold)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            ok = same(P.run(m), want)
            os._exit(0 if ok else 1)
        release.set()
        t.join()
        deadline = time.time() + 40
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                sys.exit(os.waitstatus_to_exitcode(status))
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        print("child HUNG")
        sys.exit(3)
    """)
    assert r.returncode == 0, r.stdout + r.stderr


_MP = """
    import multiprocessing as mp

    def job(threads):
        return P.run(P.wrapper(threads=threads))

    if __name__ == "__main__":
        want = P.run(P.wrapper(threads=2))            # OpenMP has run in the parent
        ctx = mp.get_context({method!r})
        with ctx.Pool(1) as pool:
            res = pool.apply_async(job, ({threads},))
            try:
                got = res.get(timeout={wait})
            except mp.TimeoutError:
                print("worker HUNG")
                pool.terminate()
                sys.exit(3)
        print("same" if same(got, want) else "DIFFERENT")
        sys.exit(0 if same(got, want) else 1)
"""


def _python_file(tmp_path, code, timeout=CHILD_TIMEOUT):
    """spawn re-imports __main__: it must be a file."""
    path = tmp_path / "mp_job.py"
    path.write_text(_PRELUDE + textwrap.dedent(code))
    return run_python([str(path)], timeout)


def test_multiprocessing_spawn(tmp_path):
    """spawn starts a fresh interpreter: a worker may use any thread count."""
    r = _python_file(tmp_path, _MP.format(method="spawn", threads=2, wait=40))
    assert r.returncode == 0 and "same" in r.stdout, r.stdout + r.stderr


def test_multiprocessing_fork_single_thread_worker(tmp_path):
    """fork (Linux's default before Python 3.14): a worker on one thread works."""
    r = _python_file(tmp_path, _MP.format(method="fork", threads=1, wait=40))
    assert r.returncode == 0 and "same" in r.stdout, r.stdout + r.stderr
