"""The 'ktsft' transformers experts implementation, checked against
transformers' own 'eager' experts with the same PEFT LoRA (PEFT's
ParamWrapper on gate_up_proj / down_proj, LoRA on attention): logits, the
input gradient, the router's gradient and every LoRA gradient, on tiny
models of every supported family; then the properties users rely on
(deepcopy/pickle/torch.save, save_pretrained, PEFT's own adapter files, no
dense W + dW, clear refusals)."""
import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import ktsft.integrations.transformers as kti  # noqa: E402
from ktsft.integrations import hf_experts  # noqa: E402
from hf_tiny import FAMILIES, build, lora_config, rel, tokens  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402


def pair(family, dtype=torch.float32, cfg=None, order="after", **kw):
    """(eager PEFT model, ktsft PEFT model) with identical weights and LoRA."""
    base = build(family, dtype=dtype, **kw)
    lc = cfg or lora_config(family)
    if order == "before":  # set_experts_implementation before get_peft_model
        k_base = copy.deepcopy(base)
        k_base.set_experts_implementation("ktsft")
        torch.manual_seed(11)
        mk = get_peft_model(k_base, copy.deepcopy(lc))
        torch.manual_seed(11)
        me = get_peft_model(base, copy.deepcopy(lc))
        me.base_model.model.set_experts_implementation("eager")
        return me, mk
    torch.manual_seed(11)
    me = get_peft_model(base, lc)
    me.base_model.model.set_experts_implementation("eager")
    mk = copy.deepcopy(me)
    mk.base_model.model.set_experts_implementation("ktsft")
    return me, mk


def routers(model):
    return [p for n, p in model.named_parameters()
            if n.endswith("mlp.gate.weight") and p.dim() == 2]


def step(model, ids, train_router=True):
    """Forward + backward from input embeddings: (logits, grads by name)."""
    model.train()
    for p in routers(model):
        p.requires_grad_(train_router)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = emb.grad.clone()
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(me, mk, ids):
    """One step of the eager and the ktsft model: logits <= 1e-5, every
    gradient (input, router, LoRA) <= 1e-4.  Returns both steps' results."""
    le, _, ge = step(me, ids)
    lk, _, gk = step(mk, ids)
    assert rel(lk, le) <= 1e-5
    assert sorted(gk) == sorted(ge)
    for n in ge:
        assert rel(gk[n], ge[n]) <= 1e-4, n
    return ge


def test_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert "ktsft" in ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["ktsft"] is kti.ktsft_experts_forward


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager_with_peft(family):
    me, mk = pair(family)
    ids = tokens()
    ge = assert_same(me, mk, ids)
    names = [n for n in ge if "lora" in n]
    assert any("experts" in n for n in names) and any("attn" in n for n in names)
    assert any(n.endswith("mlp.gate.weight") for n in ge)  # the router's gradient is compared
    # the layers share one LoRA staging (forward l0, l1, backward l1, l0 above)
    mods = [m for m in mk.modules() if m in hf_experts._STATE]
    assert len(mods) >= 1
    assert len({id(hf_experts._STATE[m].staging(4)) for m in mods}) == 1


def test_numa_pools_match_eager():
    """configure(threadpool_count=2): each layer's threads in two pools
    (here over the CPUs this machine has), still transformers' eager
    result, and the layers' wrappers hold the pools."""
    me, mk = pair("qwen3_moe")
    kti.configure(mk, threads=3, threadpool_count=2)
    assert_same(me, mk, tokens())
    wrappers = [w for st in hf_experts._STATE.values() for w in st.wrappers.values()
                if st.module() in set(mk.modules())]
    assert wrappers and all(w.threadpool_count == 2 for w in wrappers)
    assert all(len(w.numa_info()["pools"]) == 2 for w in wrappers)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_peft_before_set_experts_implementation(family):
    me, mk = pair(family, order="before")
    ids = tokens(4)
    assert_same(me, mk, ids)


def test_adamw_steps_side_by_side():
    me, mk = pair("qwen3_moe")
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (me, mk)]
    for i in range(4):
        ids = tokens(20 + i)
        losses = []
        for m, opt in zip((me, mk), opts):
            m.train()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), (i, losses)
    pe = dict(me.named_parameters())
    for n, p in mk.named_parameters():
        if p.requires_grad:
            assert rel(p, pe[n]) <= 1e-4, n


@pytest.mark.parametrize("targets", [("down_proj",), ("gate_up_proj",)])
def test_subset_targets(targets):
    me, mk = pair("qwen3_moe", cfg=lora_config("qwen3_moe", targets=targets))
    ids = tokens(5)
    assert_same(me, mk, ids)


def test_rslora_and_per_parameter_alpha():
    lc = lora_config("qwen3_moe", r=4, alpha=8, use_rslora=True,
                     alpha_pattern={"mlp.experts.down_proj": 3})  # gate_up and down scale differently
    me, mk = pair("qwen3_moe", cfg=lc)
    ids = tokens(6)
    assert_same(me, mk, ids)


def test_disabled_and_merged_adapters():
    me, mk = pair("qwen3_moe")
    ids = tokens(7)
    with torch.no_grad():
        with me.disable_adapter():
            be = me(input_ids=ids).logits
        with mk.disable_adapter():
            bk = mk(input_ids=ids).logits
        assert rel(bk, be) <= 1e-5
        le = me(input_ids=ids).logits
        merged = mk.merge_and_unload()
        assert rel(merged(input_ids=ids).logits, le) <= 1e-5


def test_bf16_weights_run_bf16_kernels_and_autocast():
    me, mk = pair("qwen3_moe", dtype=torch.bfloat16)
    ids = tokens(8)
    le, _, ge = step(me, ids)
    lk, _, gk = step(mk, ids)
    assert rel(lk, le) <= 3e-2
    w = next(iter(hf_experts._STATE.values())).wrappers
    assert {x.dtype for x in w.values()} == {"bf16"}
    # fp32 weights under bf16 autocast: custom_fwd/custom_bwd keep backward consistent
    me, mk = pair("olmoe")
    res = []
    for m in (me, mk):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res.append(step(m, ids))
    assert rel(res[1][0], res[0][0]) <= 3e-2
    for n in res[0][2]:
        assert rel(res[1][2][n], res[0][2][n]) <= 1e-1, n


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    _, mk = pair("qwen3_moe")
    ids = tokens(9)
    _, _, want = step(mk, ids)
    mk.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        mk.enable_input_require_grads()
    _, _, got = step(mk, ids)
    for n in want:
        if n == "inputs_embeds" and reentrant:
            continue
        assert rel(got[n], want[n]) <= 1e-6, n
    if not reentrant:  # saved-tensor hooks active: no private cache was kept
        assert all(w.cache_depth == 0 for b in hf_experts._STATE.values()
                   for w in b.wrappers.values())


def test_deepcopy_pickle_torch_save():
    _, mk = pair("qwen3_moe")
    ids = tokens(10)
    with torch.no_grad():
        want = mk(input_ids=ids).logits
    c = copy.deepcopy(mk)
    p = pickle.loads(pickle.dumps(mk))
    buf = io.BytesIO()
    torch.save(mk, buf)
    buf.seek(0)
    s = torch.load(buf, weights_only=False)
    for m in (c, p, s):
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids).logits, want)
    # the copy trains on its own: a step on the original leaves it unchanged
    opt = torch.optim.SGD([q for q in mk.parameters() if q.requires_grad], lr=1.0)
    mk.train()
    mk(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(c(input_ids=ids).logits, want)
        assert not torch.equal(mk(input_ids=ids).logits, want)


def test_save_pretrained_and_peft_loading(tmp_path):
    me, mk = pair("mixtral")
    ids = tokens(11)
    opt = torch.optim.AdamW([q for q in mk.parameters() if q.requires_grad], lr=1e-2)
    for _ in range(2):  # train a little through ktsft
        mk.train()
        mk(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    mk.eval()
    with torch.no_grad():
        want = mk(input_ids=ids).logits
    mk.save_pretrained(tmp_path / "adapter")            # PEFT's own adapter files
    base = mk.get_base_model()
    with mk.disable_adapter():
        with torch.no_grad():
            want_base = mk(input_ids=ids).logits
    # the base model as transformers saves it: expert weights included
    peft.utils.save_and_load  # noqa: B018 (imported: PEFT present)
    unwrapped = copy.deepcopy(mk).merge_and_unload()  # same base + merged LoRA
    del unwrapped
    stock = build("mixtral")  # never saw ktsft
    stock.save_pretrained(tmp_path / "base")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                              experts_implementation="ktsft")
    with torch.no_grad():
        assert rel(again(input_ids=ids).logits, want_base) <= 1e-5
    fresh = build("mixtral")
    fresh.set_experts_implementation("eager")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel(loaded(input_ids=ids).logits, want) <= 1e-5
    assert base is not None


def test_save_pretrained_of_ktsft_model_keeps_expert_weights(tmp_path):
    m = build("qwen3_moe")
    m.set_experts_implementation("ktsft")
    ids = tokens(12)
    with torch.no_grad():
        want = m(input_ids=ids).logits
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                             experts_implementation="eager")
    with torch.no_grad():
        assert rel(back(input_ids=ids).logits, want) <= 1e-5


def test_base_weights_read_in_place_and_rebound():
    m = build("qwen3_moe")
    m.set_experts_implementation("ktsft")
    ids = tokens(13)
    with torch.no_grad():
        m(input_ids=ids)
    ex = m.model.layers[0].mlp.experts
    b = hf_experts._STATE[ex]
    w = next(iter(b.wrappers.values()))
    gate, up, down = w.stored_weights()[:3]
    I, H = ex.gate_up_proj.shape[1] // 2, ex.gate_up_proj.shape[2]
    assert gate.ctypes.data == ex.gate_up_proj.data_ptr()
    assert up.ctypes.data == ex.gate_up_proj.data_ptr() + I * H * 4
    assert down.ctypes.data == ex.down_proj.data_ptr()
    with torch.no_grad():
        ex.down_proj.data = ex.down_proj.data * 0  # replaced storage: rebound next call
        got = m(input_ids=ids).logits
        m.set_experts_implementation("eager")
        assert rel(got, m(input_ids=ids).logits) <= 1e-5


def test_refusals():
    gpt = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2)
    g = transformers.GptOssForCausalLM(gpt).float()
    g.set_experts_implementation("ktsft")
    with pytest.raises(NotImplementedError, match="GptOssExperts.*biases"):
        g(input_ids=tokens(1)[:, :4] % 64)
    m = build("qwen3_moe")
    m.set_experts_implementation("ktsft")
    m.train()
    with pytest.raises(RuntimeError, match="require grad.*LoRA only"):
        m(input_ids=tokens(2))
    with torch.no_grad():
        h = m.half()
        with pytest.raises(TypeError, match="float16.*configure"):
            h(input_ids=tokens(2))
        kti.configure(m, dtype="bf16")
        assert m.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
        m.float()  # the rest back to fp32; experts stay bf16 only where configure put them
        kti.configure(m, dtype="fp32")
        m(input_ids=tokens(2))
    with pytest.raises(ValueError, match="dtype must be"):
        kti.configure(m, dtype="int3")


def test_no_dense_delta_peak_memory():
    """Peak RSS of a training forward + backward at a shape where W + dW of
    all experts dominates: PEFT on eager materialises it, ktsft does not."""
    script = textwrap.dedent("""
        import sys, torch, transformers, ktsft.integrations.transformers
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=512, intermediate_size=64,
            moe_intermediate_size=1024, num_experts=64, num_experts_per_tok=2,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        m = transformers.Qwen3MoeForCausalLM(cfg)
        m = get_peft_model(m, LoraConfig(r=8, target_parameters=[
            "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        m.base_model.model.set_experts_implementation(sys.argv[1])
        ids = torch.randint(0, 64, (1, 16))
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()   # warm up (allocator, wrappers)
        def hwm():
            return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
        def rss():
            return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
        r0 = rss()
        open("/proc/self/clear_refs", "w").write("5")
        m(input_ids=ids, labels=ids).loss.backward()
        print((hwm() - r0) * 1024)
    """)
    peaks = {}
    for impl in ("eager", "ktsft"):
        out = subprocess.run([sys.executable, "-c", script, impl], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        peaks[impl] = int(out.stdout.strip().splitlines()[-1])
    dense = 64 * (2 * 1024 * 512 + 512 * 1024) * 4  # W + dW of gate_up and down, fp32: 384 MiB
    print(f"peak RSS of a training step: eager+PEFT {peaks['eager'] / 2**20:.0f} MiB, ktsft "
          f"{peaks['ktsft'] / 2**20:.1f} MiB, dense W + dW {dense / 2**20:.0f} MiB")
    assert peaks["eager"] >= 0.9 * dense, peaks
    assert peaks["ktsft"] <= 0.1 * dense, peaks
