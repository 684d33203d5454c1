"""ktsft.optim.CPUAdamW against torch.optim.AdamW: the math over several
steps, param groups, state_dict in both directions and resume, thread and
ISA independence, bad input."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ktsft._kernels import moe_sft  # noqa: E402
from ktsft.optim import CPUAdamW  # noqa: E402

SHAPES = [(0,), (1,), (17,), (3, 5), (16384 + 3,), (2, 3, 4099)]  # empty, odd, block edges
CONFIGS = [
    dict(lr=1e-3, weight_decay=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
    dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1),  # beta1 < 0.5: torch's other lerp form
    dict(lr=1e-3, amsgrad=True),
    dict(lr=1e-3, maximize=True, weight_decay=0.05),
]


def _params(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * (1 + 10 * (i % 2)) for i, p in enumerate(params)]


def _close(got, want, steps=8, err_msg=""):
    """Equal to fp32 rounding: a few ulps of the largest magnitude on the
    path (a value that shrinks keeps the absolute error of its past size)."""
    got, want = got.detach().double().numpy(), want.detach().double().numpy()
    if want.size == 0:
        return
    ulp = 2.0 ** -23 * float(np.abs(want).max() + np.abs(got).max())
    np.testing.assert_allclose(got, want, rtol=4 * steps * 2.0 ** -23, atol=steps * ulp,
                               err_msg=err_msg)


def _run(opt_cls, params, steps, seed=0, **kw):
    opt = opt_cls(params, **kw)
    for s in range(steps):
        for p, g in zip(params, _grads(params, seed + s)):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torch_adamw(cfg):
    a, b = _params(1), _params(1)
    oa = _run(torch.optim.AdamW, a, 8, foreach=False, **cfg)
    ob = _run(CPUAdamW, b, 8, threads=2, **cfg)
    for pa, pb in zip(a, b):
        _close(pb, pa)
    for pa, pb in zip(a, b):
        for k in oa.state[pa]:
            _close(ob.state[pb][k], oa.state[pa][k], err_msg=k)
        assert ob.state[pb]["step"].dtype == oa.state[pa]["step"].dtype


def test_same_bits_for_any_thread_count_and_isa():
    ref = None
    for isa in moe_sft.runnable_isas():
        for threads in (1, 2, 3):
            ps = _params(2)
            _run(CPUAdamW, ps, 3, threads=threads, isa=isa, amsgrad=True)
            got = [p.detach().clone() for p in ps]
            if ref is None:
                ref = got
            for a, b in zip(ref, got):
                assert torch.equal(a, b), (isa, threads)


def test_torch_threads_untouched():
    before = torch.get_num_threads()
    _run(CPUAdamW, _params(3), 2, threads=before + 1)
    assert torch.get_num_threads() == before


def test_param_groups_and_scheduler():
    a, b = _params(4, [(33,), (7, 9)]), _params(4, [(33,), (7, 9)])
    groups = lambda ps: [{"params": [ps[0]], "lr": 1e-2}, {"params": [ps[1]], "weight_decay": 0.3}]  # noqa: E731
    oa = torch.optim.AdamW(groups(a), lr=1e-3)
    ob = CPUAdamW(groups(b), lr=1e-3)
    sa = torch.optim.lr_scheduler.StepLR(oa, 1, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 1, gamma=0.5)
    for s in range(4):
        for ps in (a, b):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
        oa.step(), ob.step(), sa.step(), sb.step()
    for pa, pb in zip(a, b):
        _close(pb, pa)
    assert [g["lr"] for g in ob.param_groups] == [g["lr"] for g in oa.param_groups]
    # a parameter without a gradient is skipped, as torch skips it
    b[0].grad = None
    b[1].grad = torch.ones_like(b[1])
    before = b[0].detach().clone()
    ob.step()
    assert torch.equal(b[0].detach(), before)


def test_state_dict_both_ways_and_resume():
    # torch -> CPUAdamW: resume a torch run
    a, b = _params(5), _params(5)
    oa = _run(torch.optim.AdamW, a, 3, foreach=False)
    for pa, pb in zip(a, b):
        pb.data.copy_(pa.data)
    ob = CPUAdamW(b, threads=2)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for s in range(3, 6):
        for ps, o in ((a, oa), (b, ob)):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            o.step()
    for pa, pb in zip(a, b):
        _close(pb, pa)
    # CPUAdamW -> torch: the state dict has torch's keys and loads there
    sd = ob.state_dict()
    assert set(sd["param_groups"][0]) == set(oa.state_dict()["param_groups"][0])
    torch.optim.AdamW(_params(5)).load_state_dict(sd)
    # CPUAdamW -> CPUAdamW (save, new optimizer, load): bitwise the uninterrupted run
    c = _params(6)
    whole = _run(CPUAdamW, c, 6)
    d = _params(6)
    od = _run(CPUAdamW, d, 3)
    sd = copy.deepcopy(od.state_dict())
    e = [torch.nn.Parameter(p.detach().clone()) for p in d]
    oe = CPUAdamW(e)
    oe.load_state_dict(sd)
    for s in range(3, 6):
        for p, g in zip(e, _grads(e, s)):
            p.grad = g
        oe.step()
    for pc, pe in zip(c, e):
        assert torch.equal(pc.detach(), pe.detach())
    assert float(oe.state[e[0]]["step"]) == 6.0 and whole is not None


def test_pickles_and_deepcopies():
    import pickle

    ps = _params(7, [(10,)])
    import os

    threads = (os.cpu_count() or 2) + 3  # never the default: the setting must travel
    o = _run(CPUAdamW, ps, 2, threads=threads)
    for o2 in (pickle.loads(pickle.dumps(o)), copy.deepcopy(o)):
        assert o2.threads == threads and o2.isa == o.isa
        assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], o.state[ps[0]]["exp_avg"])


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=0.9), "betas"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(threads=0), "threads"), (dict(threads=1.5), "threads"), (dict(threads=100_000), "threads"),
    (dict(isa="nope"), "isa"),
    (dict(capturable=True), "capturable"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        CPUAdamW(_params(8, [(4,)]), **kw)


def test_bad_parameters_and_gradients():
    with pytest.raises(ValueError, match=r"parameter 1 \(4,\) is torch.bfloat16"):
        CPUAdamW([torch.nn.Parameter(torch.zeros(3)),
                  torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="not contiguous"):
        CPUAdamW([torch.nn.Parameter(torch.zeros(4, 6).t())])
    with pytest.raises(ValueError, match="param group 1"):
        CPUAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))]},
                  {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -1}])
    ps = _params(9, [(5,), (6,)])
    o = CPUAdamW(ps)
    before = [p.detach().clone() for p in ps]
    ps[0].grad = torch.ones(5)
    if hasattr(ps[1], "grad_dtype"):
        ps[1].grad_dtype = None  # torch >= 2.10 refuses the mismatch unless told otherwise
    ps[1].grad = torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"parameter 1 \(6,\): its grad is torch.float64"):
        o.step()
    # nothing moved, no state was counted
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, ps))
    assert all(float(o.state[p]["step"]) == 0.0 for p in ps if p in o.state)
    # a non-contiguous gradient is used as it is meant
    q = torch.nn.Parameter(torch.zeros(4, 6))
    r = torch.nn.Parameter(torch.zeros(4, 6))
    g = torch.randn(6, 4).t()
    q.grad, r.grad = g, g.contiguous()
    CPUAdamW([q]).step(), CPUAdamW([r]).step()
    assert torch.equal(q.detach(), r.detach())


def test_state_of_another_model_is_refused():
    o = _run(CPUAdamW, _params(10, [(5,)]), 1)
    p = torch.nn.Parameter(torch.zeros(7))
    o2 = CPUAdamW([p])
    sd = o.state_dict()
    o2.load_state_dict(sd)
    p.grad = torch.ones(7)
    with pytest.raises(ValueError, match="5 elements for a parameter of 7"):
        o2.step()
    assert torch.equal(p.detach(), torch.zeros(7))
