"""Resource failures a test can provoke: each becomes a Python exception
and loses no state.

- OpenMP cannot create its threads (an address-space limit): GNU OpenMP
  would exit the process; ktsft raises naming the thread setting.
- A native allocation fails inside a forward or backward (every one in
  turn, by the kernels' fault-injection hook): MemoryError; a backward's
  cache entry stays cached and the retried step gives bitwise the result
  of an undisturbed one; `out` and `grads_out` are untouched.
- The disk fills mid-save (a file-size limit): OSError naming the file;
  the adapter or weights already there are intact, no temporary is left.
- A save into a path under a file, or a read-only directory: the error
  names the path.

Subprocesses run under a timeout, so a crash or hang fails the test.
"""
import os
import sys
import textwrap

import numpy as np
import pytest

from conftest import Problem, run_python
from ktsft._kernels import moe_sft
from ktsft.schema import LORA_GRAD_NAMES, lora_shapes

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 120

_PRELUDE = f"""
import os, resource, sys
sys.path.insert(0, {TESTS!r})
import numpy as np
import torch  # every library mapped before the address space is limited
import safetensors.numpy
from conftest import Problem

def vm_bytes():
    return int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")

def limit_address_space(headroom):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + headroom, hard))

def same(a, b):
    return all(np.array_equal(a[n], b[n]) for n in b)
"""


def _python(code):
    return run_python(["-c", _PRELUDE + textwrap.dedent(code)], TIMEOUT)


needs_openmp = pytest.mark.skipif(not moe_sft.openmp_enabled(), reason="built without OpenMP")
# AddressSanitizer maps its own shadow for every new thread: under an
# address-space limit its runtime aborts before libgomp or ktsft can react
no_asan = pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                             reason="an address-space limit aborts ASan's own runtime")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="/proc and RLIMIT_AS semantics of Linux")


# ---------------------------------------------------------------------------
# thread creation
# ---------------------------------------------------------------------------
_THREADS = """
    P = Problem(T=9)
    m = P.wrapper(threads=1)
    want = P.run(m)                      # every buffer of this shape exists now
    from ktsft.optim import CPUAdamW
    p = torch.nn.Parameter(torch.ones(1000))
    p.grad = torch.full((1000,), 0.5)
    opt = CPUAdamW([p], lr=0.1, threads=64)
    limit_address_space(48 << 20)        # 63 thread stacks of 8 MiB do not fit
    {patch}
    m.cpuinfer_threads = 64
    try:
        m.forward_sft(P.x, P.ids, P.w)
        print("forward: no error")
    except RuntimeError as e:
        print("forward:", e)
    assert not m.cache_entries()["cached"], "a refused forward cached an entry"
    try:
        m.backward(P.dO)
    except RuntimeError as e:
        print("backward:", e)             # nothing cached: the usual error
    try:
        opt.step()
        print("adamw: no error")
    except RuntimeError as e:
        print("adamw:", e)
    assert bool((p.detach() == 1).all()) and not opt.state[p].get("step"), "the step ran"
    m.cpuinfer_threads = 1
    print("after:", "same" if same(P.run(m), want) else "DIFFERENT")
"""


@needs_openmp
@linux_only
@no_asan
def test_thread_creation_failure_raises_naming_the_setting():
    r = _python(_THREADS.format(patch=""))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "forward: cpuinfer_threads=64: the OpenMP runtime cannot create 63 more threads" in out
    assert "Lower cpuinfer_threads" in out
    assert "adamw: CPUAdamW threads=64: the OpenMP runtime cannot create" in out
    assert "after: same" in out


@needs_openmp
@linux_only
@no_asan
def test_without_the_probe_libgomp_would_exit_the_process():
    """The control: the same run with the probe disabled dies in libgomp
    (so the test above does provoke the crash class)."""
    patch = "import ktsft._threads as th; th.probe_threads = lambda n, stack: 0"
    r = _python(_THREADS.format(patch=patch))
    assert r.returncode != 0 and "after:" not in r.stdout, r.stdout + r.stderr
    assert "Thread creation failed" in r.stderr or r.returncode < 0, r.stderr


def test_thread_team_is_probed_once_per_setting(monkeypatch):
    import ktsft._threads as th

    calls = []
    monkeypatch.setattr(th, "probe_threads", lambda n, stack: calls.append(n) or 0)
    monkeypatch.setattr(th, "_team", __import__("threading").local())
    for n in (4, 4, 2, 1, 2, 4, 3, 4):
        assert th.effective_threads(n) == n
    # 1 -> 4 (3 new), 2 -> 4 (2 new), 3 -> 4 (1 new); a serial call keeps the team
    assert calls == [3, 2, 1]


@pytest.mark.parametrize("value,bytes_", [("", 0), ("64", 64 << 10), ("2M", 2 << 20),
                                          ("512 k", 512 << 10), ("1G", 1 << 30), ("7B", 7),
                                          ("bogus", 0)])
def test_stack_size_read_as_libgomp_reads_it(value, bytes_):
    import ktsft._threads as th

    assert th._stack_bytes({"OMP_STACKSIZE": value}) == bytes_


def test_probe_threads_creates_and_joins():
    assert moe_sft.probe_threads(0) == 0
    assert moe_sft.probe_threads(3) == 0
    assert moe_sft.probe_threads(2, 1 << 20) == 0
    with pytest.raises(ValueError, match="n=-1"):
        moe_sft.probe_threads(-1)


# ---------------------------------------------------------------------------
# native allocation failures
# ---------------------------------------------------------------------------
@pytest.fixture
def fail_allocation():
    yield moe_sft._fail_allocation
    moe_sft._fail_allocation(-1)


def _sweep(call, fail_allocation, limit=64):
    """Fail the 0th, 1st, ... native allocation of call() until it passes;
    returns (result, how many failed); check(...) after each failure."""
    for n in range(limit):
        fail_allocation(n)
        try:
            result = call()
        except MemoryError as e:
            yield n, e
            continue
        finally:
            fail_allocation(-1)
        yield n, result
        return
    pytest.fail(f"still failing after {limit} injected allocation failures")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_allocation_failure_in_backward_keeps_the_step(dtype, dropout, fail_allocation):
    P = Problem(T=40, E=6, k=3, routing="skewed")
    ref = P.wrapper(dtype, lora_dropout=dropout)
    ref.forward_sft(P.x, P.ids, P.w, dropout_seed=11)
    dx_ref, g_ref = ref.backward(P.dO)
    m = P.wrapper(dtype, lora_dropout=dropout)
    m.forward_sft(P.x, P.ids, P.w, dropout_seed=11)
    entry = m.cache_entries()["cached"][0]
    shapes = lora_shapes(P.E, P.H, P.I, P.r)
    grads_out = {n: np.full(shapes[n], 0.5, np.float32) for n in LORA_GRAD_NAMES}
    failures = 0
    for n, res in _sweep(lambda: m.backward(P.dO, grads_out=grads_out, accumulate=True),
                         fail_allocation):
        if isinstance(res, MemoryError):
            failures += 1
            assert "ktsft backward: cannot allocate" in str(res)
            assert m.cache_entries()["cached"] == (entry,), "the cached forward was dropped"
            for g in grads_out.values():
                assert (g == 0.5).all(), "a failed backward wrote a gradient"
        else:
            dx, _ = res
    # the backward allocates each phase's task list (and one dropout scratch)
    assert failures >= 5 + (dropout > 0)
    assert not m.cache_entries()["cached"]
    assert np.array_equal(dx, dx_ref)
    for n in LORA_GRAD_NAMES:
        assert np.array_equal(grads_out[n], np.float32(0.5) + g_ref[n]), n


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_allocation_failure_in_forward_changes_nothing(dtype, fail_allocation):
    P = Problem(T=33, E=5, k=2)
    want = P.run(P.wrapper(dtype))
    m = P.wrapper(dtype, depth=2)
    out = np.full((P.T, P.H), 7.0, np.float32)
    failures = 0
    for n, res in _sweep(lambda: m.forward_sft(P.x, P.ids, P.w, out=out), fail_allocation):
        if isinstance(res, MemoryError):
            failures += 1
            assert "ktsft forward: cannot allocate" in str(res)
            assert not m.cache_entries()["cached"]
            assert (out == 7.0).all(), "a failed forward wrote its output"
    assert failures >= 6  # routing cursor, expert order, four task lists
    assert np.array_equal(out, want["out"])
    dx, grads = m.backward(P.dO)
    assert np.array_equal(dx, want["grad_input"])
    assert all(np.array_equal(grads[n], want[n]) for n in LORA_GRAD_NAMES)


# ---------------------------------------------------------------------------
# disk full, unwritable paths
# ---------------------------------------------------------------------------
_DISK_FULL = """
    import signal
    import ktsft
    P = Problem(T=5)
    m = P.wrapper()
    m.save_adapter({adapter!r})
    m.save_weights({weights!r})
    before = {{p: open(p, "rb").read() for p in {files!r}}}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    m.init_lora_weights(*[a * 2 for a in P.lora])
    for what, save, path in (("adapter", m.save_adapter, {adapter!r}),
                             ("weights", m.save_weights, {weights!r})):
        try:
            save(path)
            print(what, "no error")
        except OSError as e:
            print(what, type(e).__name__, e)
    after = {{p: open(p, "rb").read() for p in {files!r}}}
    print("intact" if after == before else "CHANGED")
    print("left:", sorted(os.listdir({root!r})))
"""


@linux_only
def test_disk_full_mid_save_raises_naming_the_file_and_keeps_the_old(tmp_path):
    adapter, weights = str(tmp_path / "ad"), str(tmp_path / "layer.safetensors")
    files = [os.path.join(adapter, "adapter_model.safetensors"),
             os.path.join(adapter, "adapter_config.json"), weights]
    r = _python(_DISK_FULL.format(adapter=adapter, weights=weights, files=files,
                                  root=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    ad = next(ln for ln in lines if ln.startswith("adapter "))
    wt = next(ln for ln in lines if ln.startswith("weights "))
    assert "OSError" in ad and "File too large" in ad and str(tmp_path) in ad, ad
    assert "OSError" in wt and "File too large" in wt and str(tmp_path) in wt, wt
    assert "intact" in lines
    assert "left: ['ad', 'layer.safetensors']" in lines, r.stdout


def test_save_under_a_file_names_the_path(tmp_path):
    P = Problem(T=3)
    m = P.wrapper()
    f = tmp_path / "plain.txt"
    f.write_text("x")
    with pytest.raises(OSError, match="plain.txt"):
        m.save_adapter(str(f / "ad"))
    with pytest.raises(OSError, match="plain.txt"):
        m.save_weights(str(f / "w.safetensors"))
    assert f.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_directory_names_the_path(tmp_path):
    P = Problem(T=3)
    m = P.wrapper()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OSError, match="ro"):
            m.save_adapter(str(ro / "ad"))
        with pytest.raises(OSError, match="ro"):
            m.save_weights(str(ro / "w.safetensors"))
    finally:
        ro.chmod(0o700)
    assert os.listdir(ro) == []


# ---------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------
_SIGNALS = """
    import signal, time
    P = Problem(T=96, H=64, I=48, E=6, k=2, seed=3)
    want = P.run(P.wrapper(threads=2))
    m = P.wrapper(threads=2)

    class Tick(BaseException):  # as KeyboardInterrupt: no `except Exception` swallows it
        pass

    def tick(sig, frame):
        raise Tick()

    def check(got, names):
        for n in names:
            assert np.array_equal(np.asarray(got[n]), want[n]), n

    counts = dict(steps=0, ticks=0, consumed=0, resumed=0)
    GRADS = [n for n in want if n.startswith("grad_") and n != "grad_input"]

    def step():
        if m.cache_depth:                 # a forward left cached by an interrupted step
            try:
                dx, g = m.backward(P.dO)
            except RuntimeError as e:
                assert "already consumed" in str(e), e
                counts["consumed"] += 1
                return
            check({"grad_input": dx, **g}, ["grad_input"] + GRADS)
            counts["resumed"] += 1
            return
        out = m.forward_sft(P.x, P.ids, P.w)
        check({"out": out}, ["out"])
        dx, g = m.backward(P.dO)
        check({"grad_input": dx, **g}, ["grad_input"] + GRADS)
        counts["steps"] += 1

    t0 = time.perf_counter()
    for _ in range(5):
        step()
    per = (time.perf_counter() - t0) / 5
    signal.signal(signal.SIGALRM, tick)
    rng = np.random.default_rng(0)
    for i in range(400):
        try:
            signal.setitimer(signal.ITIMER_REAL, float(rng.uniform(1e-5, 1.5 * per)))
            step()
            signal.setitimer(signal.ITIMER_REAL, 0)
        except Tick:
            counts["ticks"] += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for _ in range(2):
        step()                            # and it still trains
    print("counts", counts)
"""


@linux_only
def test_signals_interrupting_calls_never_corrupt_a_step():
    """SIGALRM raising at random points of forward/backward (inside the
    wrapper's Python, between the kernels and the cache bookkeeping): every
    call that completes gives bitwise the undisturbed result; a backward
    interrupted after its kernels ran leaves an entry that is refused as
    consumed, never backpropagated twice."""
    r = _python(_SIGNALS)
    assert r.returncode == 0, r.stdout + r.stderr
    counts = eval(r.stdout.split("counts", 1)[1].strip())  # noqa: S307 - our own output
    assert counts["ticks"] >= 50 and counts["steps"] >= 50, counts
