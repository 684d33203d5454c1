"""The public API: array types in and out, zero-copy LoRA, weights from
disk, the expert map, dispatch and threads."""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import ktsft
from conftest import Problem, check_against_reference, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numpy_bf16_in_bf16_out():
    p = Problem(T=5, H=32, I=16, E=4, k=2, r=2)
    m = p.wrapper(dtype="bf16")
    out = m.forward_sft(p.x.astype(ml_dtypes.bfloat16), p.ids.astype(np.int32), p.w)
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (5, 32)
    dx, grads = m.backward(p.dO.astype(ml_dtypes.bfloat16))
    assert dx.dtype == ml_dtypes.bfloat16
    assert grads["grad_gate_lora_a"].dtype == np.float32
    assert rel_err(out.astype(np.float32), p.reference()["out"]) < 2e-2


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    p = Problem(T=6, H=32, I=16, E=4, k=2, r=2)
    m = p.wrapper(dtype="fp32")
    out = m.forward_sft(torch.from_numpy(p.x), torch.from_numpy(p.ids), torch.from_numpy(p.w))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    dx, grads = m.backward(torch.from_numpy(p.dO))
    assert isinstance(dx, torch.Tensor)
    assert all(isinstance(v, torch.Tensor) for v in grads.values())
    got = {"out": out.numpy(), "grad_input": dx.numpy()}
    got.update({n: v.numpy() for n, v in grads.items()})
    check_against_reference(p, got, "fp32")
    # bf16 tensors in, bf16 tensors out
    m16 = p.wrapper(dtype="bf16")
    out16 = m16.forward_sft(torch.from_numpy(p.x).bfloat16(), torch.from_numpy(p.ids),
                            torch.from_numpy(p.w).bfloat16())
    assert out16.dtype == torch.bfloat16
    dx16, _ = m16.backward(torch.from_numpy(p.dO).bfloat16())
    assert dx16.dtype == torch.bfloat16
    assert rel_err(out16.float().numpy(), p.reference()["out"]) < 2e-2


def test_lora_is_zero_copy():
    p = Problem(T=5, H=24, I=16, E=3, k=2, r=2)
    m = p.wrapper()
    before = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    for a in p.lora:          # an optimizer step, in place
        a *= 1.5
    after = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert not np.allclose(before, after)
    assert rel_err(after, p.reference()["out"]) < 1e-5


def test_torch_parameters_zero_copy_and_update():
    torch = pytest.importorskip("torch")
    p = Problem(T=5, H=24, I=16, E=3, k=2, r=2)
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in p.lora]
    m = p.wrapper()
    m.init_lora_weights(*params)
    opt = torch.optim.SGD(params, lr=0.1)
    for prm in params:
        prm.grad = torch.ones_like(prm)
    opt.step()                       # in place: seen without any call
    p.lora = [prm.detach().numpy().copy() for prm in params]
    out = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert rel_err(out, p.reference()["out"]) < 1e-5
    with torch.no_grad():            # storage replaced: update_lora_weights picks it up
        for prm in params:
            prm.data = prm.data * 0.5
    m.update_lora_weights()
    p.lora = [prm.detach().numpy().copy() for prm in params]
    out = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert rel_err(out, p.reference()["out"]) < 1e-5


def test_bf16_lora_refreshed_by_update():
    p = Problem(T=5, H=24, I=16, E=3, k=2, r=2)
    lora16 = [a.astype(ml_dtypes.bfloat16) for a in p.lora]
    m = p.wrapper(dtype="bf16")
    m.init_lora_weights(*lora16)
    for a in lora16:
        a *= 2
    m.update_lora_weights()
    p.lora = [a.astype(np.float32) for a in lora16]
    out = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert rel_err(out, p.reference()["out"]) < 1e-2


def test_physical_to_logical_map():
    p = Problem(T=9, H=24, I=16, E=5, k=2, r=2, seed=8)
    m = p.wrapper()
    want = p.run(m)
    p2l = np.array([3, 0, 4, 1, 2])        # slot s holds logical expert p2l[s]
    phys = {n: np.ascontiguousarray(getattr(p, n)[p2l]) for n in ("gate_proj", "up_proj", "down_proj")}
    m2 = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, lora_rank=p.r, lora_alpha=p.alpha, dtype="fp32")
    m2.load_weights(p2l, **phys)
    m2.init_lora_weights(*p.lora)
    got = p.run(m2)
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def test_weights_from_npy_dir_and_safetensors(tmp_path):
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2)
    for n in ("gate_proj", "up_proj", "down_proj"):
        np.save(tmp_path / f"{n}.npy", getattr(p, n))
    m = ktsft.SFTMoEWrapper(0, 3, 2, 16, 8, lora_rank=2, lora_alpha=p.alpha, dtype="fp32",
                            weight_path=str(tmp_path))
    m.load_weights()
    m.init_lora_weights(*p.lora)
    check_against_reference(p, p.run(m), "fp32")

    from safetensors.numpy import save_file

    f = tmp_path / "layer.safetensors"
    save_file({n: getattr(p, n).astype(ml_dtypes.bfloat16) for n in ("gate_proj", "up_proj", "down_proj")}, str(f))
    m = ktsft.SFTMoEWrapper(0, 3, 2, 16, 8, lora_rank=2, lora_alpha=p.alpha, dtype="bf16",
                            weight_path=str(f))
    m.load_weights()
    m.init_lora_weights(*p.lora)
    check_against_reference(p, p.run(m), "bf16")
    m = ktsft.SFTMoEWrapper(0, 3, 2, 16, 8, weight_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        m.load_weights()


def test_inference_entry_points_refuse():
    m = ktsft.SFTMoEWrapper(0, 4, 2, 16, 8)
    for name in ("forward", "submit_forward", "sync_forward", "select_deferred_experts"):
        with pytest.raises(RuntimeError, match=name):
            getattr(m, name)()
    with pytest.raises(TypeError):
        ktsft.BaseSFTMoEWrapper(0, 4, 2, 16, 8)  # abstract


def test_buffer_cache():
    ktsft.KExpertsSFTBuffer.clear_cache()
    a = ktsft.KExpertsSFTBuffer.get_buffer(4, 16, 8, 3, 2, 2, dtype="bf16")
    assert ktsft.KExpertsSFTBuffer.get_buffer(4, 16, 8, 3, 2, 2, dtype="bf16") is a
    assert ktsft.KExpertsSFTBuffer.get_buffer(5, 16, 8, 3, 2, 2, dtype="bf16") is not a
    grads = a.get_lora_grads()
    assert set(grads) == {"grad_gate_lora_a", "grad_gate_lora_b", "grad_up_lora_a",
                          "grad_up_lora_b", "grad_down_lora_a", "grad_down_lora_b"}
    assert grads["grad_down_lora_b"].shape == (3, 16, 2)
    assert a.input_cpu.shape == (4, 16) and a.input_cpu.dtype == ml_dtypes.bfloat16
    if a.tensors:  # torch installed: numpy views of torch memory, no second copy
        a.tensors["grad_up_lora_a"].fill_(3.0)
        assert np.all(a.grad_up_lora_a == 3.0)
        assert len(a.get_lora_grads(as_torch=True)) == 6
    ktsft.KExpertsSFTBuffer.clear_cache()
    assert not ktsft.KExpertsSFTBuffer.capture_buffers


def test_cpu_info_reports_choice():
    info = ktsft.cpu_info()
    assert info["selected_isa"] in info["runnable_isas"]
    assert "scalar" in info["compiled_isas"]
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile"} <= set(info["features"])
    assert info["kernels"]


def _run_py(code, **env):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          cwd=ROOT)


def test_ktsft_isa_env_forces_path():
    r = _run_py("import ktsft; print(ktsft.cpu_info()['selected_isa'])", KTSFT_ISA="scalar")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "scalar"
    r = _run_py("import ktsft", KTSFT_ISA="sse9")
    assert r.returncode != 0 and "KTSFT_ISA" in r.stderr


def test_threads_of_numpy_and_torch_untouched():
    torch = pytest.importorskip("torch")
    from threadpoolctl import threadpool_info

    before_torch = torch.get_num_threads()
    before_blas = [d["num_threads"] for d in threadpool_info()]
    p = Problem(T=8, H=32, I=16, E=4, k=2, r=2)
    for threads in (1, 2, 3):
        p.run(p.wrapper(threads=threads))
    assert torch.get_num_threads() == before_torch
    assert [d["num_threads"] for d in threadpool_info()] == before_blas


def test_default_threads_follow_omp_num_threads():
    r = _run_py("import ktsft; print(ktsft.SFTMoEWrapper(0, 4, 2, 16, 8).cpuinfer_threads)",
                OMP_NUM_THREADS="3")
    assert r.stdout.strip() == "3", r.stderr


def test_staging_pool_is_bucketed_and_bounded():
    """The experts modules' device staging: token counts share power-of-two
    buckets, and at most STAGING_KEEP buckets stay alive (training on many
    sequence lengths must not keep a pinned buffer per length)."""
    pytest.importorskip("torch")
    B = ktsft.KExpertsSFTBuffer
    B.clear_cache()
    a = B.staging(100, 16, 8, 3, 2, 2, dtype="bf16")
    assert a.qlen == 128 and B.staging(128, 16, 8, 3, 2, 2, dtype="bf16") is a
    assert B.staging(65, 16, 8, 3, 2, 2, dtype="bf16") is a
    assert B.staging(1, 16, 8, 3, 2, 2, dtype="bf16").qlen == B.STAGING_MIN
    v = a.view(100)
    assert v["input_cpu"].shape == (100, 16) and v["input_cpu"].is_contiguous()
    assert v["expert_ids_cpu"].shape == (100, 2)
    for T in range(1, 5000, 37):
        B.staging(T, 16, 8, 3, 2, 2, dtype="bf16")
        assert len(B._staging) <= B.STAGING_KEEP
    with pytest.raises(ValueError, match="holds 128 tokens"):
        a.view(129)
    B.clear_cache()
