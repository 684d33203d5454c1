"""ktsft.distributed on 2 and 4 local processes (gloo over a FileStore):
expert parallelism equals one process holding every expert (outputs,
input-, routing- and LoRA-gradients, SGD trajectories, adapters); data
parallelism under DDP equals one process on the concatenated batch; a rank
that fails makes every rank fail, quickly."""
import math
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from ktsft.adapters import save_adapter  # noqa: E402
from ktsft.distributed import (ExpertPartition, LocalRunError, merge_adapter_shards,  # noqa: E402
                               run_local)
from ktsft.distributed.routing import plan_recv, plan_send  # noqa: E402
from ktsft.distributed.shards import SHARD_KEY  # noqa: E402

E, K, H, I, R = 8, 2, 64, 32, 4
TOL = 1e-5


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------
# what every rank builds: the layer, its single-process reference, batches
# ---------------------------------------------------------------------------
def base_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) / math.sqrt(s[-1]) for s in ((E, I, H), (E, I, H), (E, H, I))]


def make_pair(counts=None, dtype="fp32", layer_idx=0):
    """(expert-parallel module, single-process module), same init seed, the
    same non-zero LoRA B (so every gradient path carries data)."""
    import ktsft.torch as kt
    from ktsft.distributed import ExpertParallelLoRAExperts

    torch.set_num_threads(1)
    wb = base_weights()
    torch.manual_seed(5)
    ep = ExpertParallelLoRAExperts(E, K, H, I, r=R, alpha=8.0, dtype=dtype, threads=1,
                                   expert_counts=counts, layer_idx=layer_idx)
    torch.manual_seed(5)
    ref = kt.LoRAExperts(E, K, H, I, r=R, alpha=8.0, dtype=dtype, threads=1, layer_idx=layer_idx)
    ref.load_weights(*wb)
    lo, hi = ep.expert_range
    same_init = all(torch.equal(p, q[lo:hi]) for p, q in zip(ep.lora_parameters(),
                                                               ref.lora_parameters()))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p, q in zip(ep.lora_parameters(), ref.lora_parameters()):
            if q.abs().sum() == 0:
                q.copy_(0.3 * torch.randn(q.shape, generator=g) / math.sqrt(q.shape[-1]))
            p.copy_(q[lo:hi])
    return ep, ref, wb, same_init


def batch(T, seed, experts=E):
    """T tokens routed to k distinct experts among the first `experts`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = (torch.stack([torch.randperm(experts, generator=g)[:K] for _ in range(T)]) if T
           else torch.zeros(0, K, dtype=torch.int64))
    w = torch.rand(T, K, generator=g)
    dO = torch.randn(T, H, generator=g)
    return x, ids, w, dO


def compare_step(ep, ref, rank, batches):
    """Forward every micro-batch (all in flight), one backward of the sum;
    relative errors of this rank's outputs and input/routing gradients and
    of its experts' LoRA gradients against the reference, which sees the
    concatenation of every rank's micro-batches."""
    errs = {}
    lo, hi = ep.expert_range
    ep.zero_grad()
    ref.zero_grad()
    mine, total_ep, total_ref = [], 0, 0
    for b, per_rank in enumerate(batches):  # per_rank[r] = (x, ids, w, dO)
        x, ids, w, dO = per_rank[rank]
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = ep(xg, ids, wg)
        total_ep = total_ep + (out * dO).sum()
        X = torch.cat([p[0] for p in per_rank]).requires_grad_()
        W = torch.cat([p[2] for p in per_rank]).requires_grad_()
        ref_out = ref(X, torch.cat([p[1] for p in per_rank]), W)
        total_ref = total_ref + (ref_out * torch.cat([p[3] for p in per_rank])).sum()
        start = sum(len(p[0]) for p in per_rank[:rank])
        mine.append((b, xg, wg, out, X, W, ref_out, slice(start, start + len(x))))
    total_ep.backward()
    total_ref.backward()
    for b, xg, wg, out, X, W, ref_out, s in mine:
        if len(xg):
            errs[f"out{b}"] = rel(out, ref_out[s])
            errs[f"grad_x{b}"] = rel(xg.grad, X.grad[s])
            errs[f"grad_w{b}"] = rel(wg.grad, W.grad[s])
        else:
            errs[f"empty{b}"] = float(out.shape != (0, H) or xg.grad is None or xg.grad.numel())
    for n, p, q in zip(("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"),
                       ep.lora_parameters(), ref.lora_parameters()):
        errs[f"lora_{n}"] = rel(p.grad, q.grad[lo:hi]) if q.grad[lo:hi].any() else float(p.grad.any())
    return errs


# ---------------------------------------------------------------------------
# workers (module level: spawned processes import them)
# ---------------------------------------------------------------------------
def _ep_two_ranks(rank, world, tmp):
    from ktsft.distributed import merge_adapter_shards as merge

    res = {}
    # 1) even split, leading dims [B, S, H], SGD trajectory
    ep, ref, wb, res["same_init"] = make_pair()
    ep.load_weights(*wb)                      # the whole layer: the rank keeps its slice
    batches = [[batch(6 + 3 * r, seed=10 * b + r) for r in range(world)] for b in range(2)]
    res.update({f"even_{k}": v for k, v in compare_step(ep, ref, rank, batches).items()})
    ep.recompute = True  # the owner keeps only input references and recomputes in backward
    res.update({f"recompute_{k}": v for k, v in compare_step(ep, ref, rank, batches).items()})
    ep.recompute = False
    x, ids, w, _ = batches[0][rank]
    # LoRA dropout runs on the owner: same seed, same masks; eval mode turns it off
    plain = ep(x, ids, w).detach()
    ep.lora_dropout = 0.3
    drops = []
    for _ in range(2):
        torch.manual_seed(17)
        drops.append(ep(x, ids, w).detach())
    res["dropout_repeatable"] = torch.equal(drops[0], drops[1]) and rel(drops[0], plain) > 1e-3
    ep.eval()
    res["dropout_eval_off"] = rel(ep(x, ids, w), plain)
    ep.train()
    ep.lora_dropout = 0.0
    out3 = ep(x.reshape(3, -1, H), ids.reshape(3, -1, K), w.reshape(3, -1, K))
    res["lead_dims"] = rel(out3.reshape(-1, H), ep(x, ids, w))
    ref_start = [q.detach().clone() for q in ref.lora_parameters()]
    opt_ep = torch.optim.SGD(ep.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        opt_ep.zero_grad()
        opt_ref.zero_grad()
        xs = [batch(5, seed=100 + 10 * step + r) for r in range(world)]
        x, ids, w, tgt = xs[rank]
        # summed losses: the ranks' gradients add up to the full batch's
        (0.01 * (ep(x, ids, w) - tgt).square().sum()).backward()
        x, ids, w, tgt = (torch.cat([b[i] for b in xs]) for i in range(4))
        (0.01 * (ref(x, ids, w) - tgt).square().sum()).backward()
        opt_ep.step()
        opt_ref.step()
    lo, hi = ep.expert_range
    res["sgd_moved"] = min(rel(p, q) for p, q in zip(ref.lora_parameters(), ref_start)) > 1e-3
    res["sgd_weights"] = max(rel(p, q[lo:hi]) for p, q in zip(ep.lora_parameters(),
                                                                ref.lora_parameters()))
    # 2) adapters: shard per rank, merge on rank 0, load the merged one back
    ep.save_adapter(os.path.join(tmp, f"shard{rank}"))
    if rank == 0:
        ref.save_adapter(os.path.join(tmp, "reference"))
    dist.barrier()
    if rank == 0:
        merge([os.path.join(tmp, f"shard{r}") for r in (1, 0)], os.path.join(tmp, "merged"))
    dist.barrier()
    before = [p.detach().clone() for p in ep.lora_parameters()]
    with torch.no_grad():
        for p in ep.lora_parameters():
            p.zero_()
    ep.load_adapter(os.path.join(tmp, "merged"))
    res["merged_roundtrip"] = max(rel(p, b) for p, b in zip(ep.lora_parameters(), before))
    with torch.no_grad():
        for p in ep.lora_parameters():
            p.zero_()
    ep.load_adapter(os.path.join(tmp, f"shard{rank}"))
    res["shard_roundtrip"] = max(rel(p, b) for p, b in zip(ep.lora_parameters(), before))
    # 3) uneven split, rank 1 passes no token, bf16 storage
    for counts, dtype in (([3, 5], "fp32"), ([5, 3], "bf16")):
        ep2, ref2, wb, res[f"{dtype}{counts}_same_init"] = make_pair(counts, dtype=dtype)
        ep2.load_weights(*[t[slice(*ep2.expert_range)] for t in wb])  # only this rank's experts
        bs = [[batch(9 if r == 0 else 0, seed=50 + r) for r in range(world)]]
        res.update({f"{dtype}{counts}_{k}": v for k, v in compare_step(ep2, ref2, rank, bs).items()})
    return res


def _ep_four_ranks(rank, world, ckpt):
    counts = [1, 3, 2, 2]  # experts 0 | 1-3 | 4-5 | 6-7
    ep, ref, _, same_init = make_pair(counts, layer_idx=3)
    ep.load_checkpoint(ckpt)  # reads only this rank's experts of layer 3
    res = {"same_init": same_init, "range": ep.expert_range}
    Ts = [7, 0, 9, 3]  # rank 1 sends nothing
    # micro-batch 0: random routing; micro-batch 1: only experts 0-5, so rank 3 receives nothing
    batches = [[batch(Ts[r], seed=70 + r) for r in range(world)],
               [batch(Ts[r], seed=80 + r, experts=6) for r in range(world)]]
    res.update(compare_step(ep, ref, rank, batches))
    # the second micro-batch alone: rank 3's experts see no token, its LoRA grads are zero;
    # the bytes this rank sends are those of docs/distributed.md, to the byte
    from ktsft.distributed import STATS

    ep.zero_grad()
    x, ids, w, dO = batches[1][rank]
    STATS.reset()
    STATS.enabled = True
    (ep(x, ids, w) * dO).sum().backward()
    STATS.enabled = False
    owner = ep.partition.owner_table()
    rows = {(s, t, int(d)) for s in range(world) for t, row in enumerate(batches[1][s][1])
            for d in owner[row]}
    pairs = [(s, int(d)) for s in range(world) for row in batches[1][s][1] for d in owner[row]]
    out_rows = sum(1 for s, _, d in rows if s == rank != d)
    in_rows = sum(1 for s, _, d in rows if d == rank != s)
    out_pairs = sum(1 for s, d in pairs if s == rank != d)
    in_pairs = sum(1 for s, d in pairs if d == rank != s)
    # x and output-gradient rows out, results and input-gradient rows back, fp32
    want = 2 * H * 4 * (out_rows + in_rows) + 12 * out_pairs + 4 * in_pairs + 24 * (world - 1)
    res["bytes_as_documented"] = STATS.bytes_sent == want and out_rows + in_rows > 0
    res["idle_rank_grads_zero"] = all(not p.grad.any() for p in ep.lora_parameters()) if rank == 3 else True
    return res


def _dp_worker(rank, world, with_hf):
    import ktsft.torch as kt
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    res = {}
    wb = base_weights()
    mods = []
    for _ in range(2):  # DDP replica and the single-process reference, same init
        torch.manual_seed(3)
        m = kt.LoRAExperts(E, K, H, I, r=R, alpha=8.0, dtype="fp32", threads=1)
        m.load_weights(*wb)
        with torch.no_grad():
            m.gate_lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        mods.append(m)
    if rank == 1:  # a different init on rank 1: DDP must broadcast rank 0's
        with torch.no_grad():
            mods[0].up_lora_a.add_(1.0)
    ddp, ref = DDP(mods[0]), mods[1]
    res["broadcast"] = all(torch.equal(p, q) for p, q in zip(mods[0].parameters(), ref.parameters()))
    start = [p.detach().clone() for p in ref.parameters()]
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    T = 12
    for step in range(4):
        x, ids, w, tgt = batch(T, seed=200 + step)
        half = slice(rank * T // world, (rank + 1) * T // world)
        opt.zero_grad()
        (ddp(x[half], ids[half], w[half]) - tgt[half]).square().mean().backward()
        opt.step()
        opt_ref.zero_grad()
        (ref(x, ids, w) - tgt).square().mean().backward()
        opt_ref.step()
    res["experts_adamw"] = max(rel(p, q) for p, q in zip(mods[0].parameters(), ref.parameters()))
    res["experts_moved"] = min(rel(p, q) for p, q in zip(mods[0].parameters(), start)) > 1e-3
    res["experts_checksum"] = float(sum(p.detach().double().sum() for p in mods[0].parameters()))
    res.update(_hybrid(rank, world))
    if with_hf:
        res.update(_dp_hf(rank, world))
    return res


class _Block(torch.nn.Module):
    """A replicated projection (trained by DDP) feeding routed experts."""

    def __init__(self, experts):
        super().__init__()
        torch.manual_seed(11)
        self.proj = torch.nn.Linear(H, H)
        self.experts = experts

    def forward(self, x, ids, w):
        return self.experts(self.proj(x), ids, w)


def _hybrid(rank, world):
    """DDP on the projection, expert parallelism (own group) on the experts:
    the gradients of the mean of the ranks' losses, as one process computes
    them on the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ktsft.distributed import ExpertParallelLoRAExperts, exclude_from_ddp

    _, ref_experts, wb, _ = make_pair()
    ep_group = dist.new_group(backend="gloo")
    ep = ExpertParallelLoRAExperts(E, K, H, I, r=R, alpha=8.0, dtype="fp32", threads=1,
                                   group=ep_group)
    ep.load_weights(*wb)
    lo, hi = ep.expert_range
    with torch.no_grad():
        for p, q in zip(ep.lora_parameters(), ref_experts.lora_parameters()):
            p.copy_(q[lo:hi])
    model, ref = _Block(ep), _Block(ref_experts)
    if rank == 1:
        with torch.no_grad():
            model.proj.weight.add_(1.0)  # DDP must broadcast rank 0's copy
    shard = [p.detach().clone() for p in ep.lora_parameters()]
    ignored = exclude_from_ddp(model)
    ddp = DDP(model)
    res = {"hybrid_ignored": len(ignored) == 6,
           "hybrid_broadcast": torch.equal(model.proj.weight, ref.proj.weight),
           "hybrid_shard_kept": all(torch.equal(p, s) for p, s in zip(ep.lora_parameters(), shard))}
    xs = [batch(6, seed=300 + r) for r in range(world)]
    x, ids, w, dO = xs[rank]
    (ddp(x, ids, w) * dO).sum().backward()
    total = sum((ref(*b[:3]) * b[3]).sum() for b in xs) / world
    total.backward()
    res["hybrid_proj_grad"] = rel(model.proj.weight.grad, ref.proj.weight.grad)
    res["hybrid_lora_grad"] = max(rel(p.grad, q.grad[lo:hi]) for p, q in
                                  zip(ep.lora_parameters(), ref_experts.lora_parameters()))
    return res


def _dp_hf(rank, world):
    """A tiny Qwen3-MoE patched by apply_lora_experts, under DDP."""
    import transformers
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ktsft.integrations.transformers import (apply_lora_experts, load_lora_state_dict,
                                                 lora_state_dict)

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_experts=E,
        num_experts_per_tok=K, norm_topk_prob=True, head_dim=12, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = apply_lora_experts(transformers.Qwen3MoeForCausalLM(cfg).float(), r=R, alpha=8,
                               dtype="fp32", threads=1)
        g = torch.Generator().manual_seed(7)
        load_lora_state_dict(m, {k: (0.3 * torch.randn(v.shape, generator=g) if k.endswith("_b")
                                     else v) for k, v in lora_state_dict(m).items()})
        models.append(m)
    ddp, ref = DDP(models[0]), models[1]
    start = {k: v.clone() for k, v in lora_state_dict(ref).items()}
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        opt.zero_grad()
        ddp(ids[rank:rank + 1], labels=ids[rank:rank + 1]).loss.backward()  # same tokens per rank
        opt.step()
        opt_ref.zero_grad()
        ref(ids, labels=ids).loss.backward()
        opt_ref.step()
    a, b = lora_state_dict(models[0]), lora_state_dict(ref)
    return {"hf_lora_tensors": len(a), "hf_adamw": max(rel(a[k], b[k]) for k in a),
            "hf_moved": min(rel(a[k], start[k]) for k in a) > 1e-4}


def _failures(rank, world):
    """Three failures inside the module, each on rank 1 only; every rank
    must raise, and the group must stay usable afterwards."""
    from ktsft.distributed import RankFailedError

    ep, _, wb, _ = make_pair()
    ep.load_weights(*wb)
    x, ids, w, dO = batch(5, seed=rank)
    seen = {}

    def attempt(name, fn):
        try:
            fn()
            seen[name] = "no error"
        except RankFailedError as e:
            seen[name] = f"peer: {e}"
        except Exception as e:  # noqa: BLE001
            seen[name] = f"own: {type(e).__name__}: {e}"

    bad_ids = ids.clone()
    if rank == 1:
        bad_ids[0, 0] = E + 4
    attempt("bad_input", lambda: ep(x, bad_ids, w))

    real_forward = ep.local.forward

    def broken(*a):
        raise MemoryError("injected failure in the local experts")

    if rank == 1:
        ep.local.forward = broken
    attempt("local_forward", lambda: ep(x, ids, w))
    ep.local.forward = real_forward

    out = ep(x, ids, w)
    bad_dO = dO.clone()
    if rank == 1:
        bad_dO[0, 0] = float("nan")  # the owner's kernel rejects a non-finite gradient
    attempt("local_backward", lambda: out.backward(bad_dO))

    ep.zero_grad()
    (ep(x, ids, w) * dO).sum().backward()  # the group still works
    seen["recovered"] = bool(ep.gate_lora_a.grad.abs().sum() > 0)
    return seen


def _disagreeing_sizes(rank, world):
    """Ranks built with other sizes (or one rank's arguments refused):
    every rank raises in the constructor, before any tensor moves (gloo
    aborted the process on the mismatched all_to_all)."""
    from ktsft.distributed import ExpertParallelLoRAExperts, RankFailedError

    seen = {}
    cases = {"hidden_size": dict(hidden_size=H if rank == 0 else H + 16),
             "r": dict(r=R + rank),
             "refused": dict(threads=1 if rank == 0 else 0)}  # refused on rank 1 only
    for name, kw in cases.items():
        args = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, r=R,
                    dtype="fp32", threads=1)
        args.update(kw)
        try:
            ExpertParallelLoRAExperts(**args)
            seen[name] = "built"
        except RankFailedError as e:
            seen[name] = f"peer: {e}"
        except Exception as e:  # noqa: BLE001
            seen[name] = f"{type(e).__name__}: {e}"
    # the group is still usable: a consistent layer trains
    ep, _, wb, _ = make_pair()
    ep.load_weights(*wb)
    x, ids, w, dO = batch(4, seed=rank)
    (ep(x, ids, w) * dO).sum().backward()
    seen["recovered"] = bool(ep.gate_lora_a.grad.abs().sum() > 0)
    return seen


def _dies_before_forward(rank, world):
    ep, _, wb, _ = make_pair()
    ep.load_weights(*wb)
    x, ids, w, _ = batch(4, seed=rank)
    if rank == 1:
        raise KeyError("user code on rank 1 failed before the forward")
    ep(x, ids, w)  # blocks in the first collective until the peer's loss is noticed
    return "returned"


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
def _assert_small(res, rank):
    for k, v in res.items():
        if isinstance(v, float):
            assert v <= TOL, f"rank {rank}: {k} = {v:.3e} > {TOL}"
        elif isinstance(v, bool):
            assert v, f"rank {rank}: {k} is False"


def test_expert_parallel_two_ranks_equals_one_process(tmp_path):
    results = run_local(_ep_two_ranks, 2, (str(tmp_path),), timeout=120, collective_timeout=60)
    for rank, res in enumerate(results):
        assert res["same_init"] and "even_out0" in res and "sgd_weights" in res
        assert ("fp32[3, 5]_grad_w0" in res) == (rank == 0)  # rank 1 passed no token
        assert ("bf16[5, 3]_empty0" in res) == (rank == 1)
        _assert_small(res, rank)
    # the merged adapter is the single-process module's adapter
    from safetensors.numpy import load_file

    got = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    want = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) == 6 * E
    for key in want:
        assert rel(got[key], want[key]) <= TOL, key
    import json

    cfg = {n: json.loads((tmp_path / n / "adapter_config.json").read_text())
           for n in ("merged", "reference", "shard0")}
    assert cfg["merged"] == cfg["reference"]
    assert cfg["shard0"][SHARD_KEY]["layers"] == {"0": {"num_experts": E, "experts": [0, 4]}}


def test_expert_parallel_four_ranks_uneven_idle_and_checkpoint_shards(tmp_path):
    from safetensors.torch import save_file

    wb = base_weights()
    ckpt = {f"model.layers.3.mlp.experts.{e}.{n}.weight": wb[i][e].contiguous()
            for e in range(E) for i, n in enumerate(("gate_proj", "up_proj", "down_proj"))}
    ckpt["model.layers.2.mlp.experts.0.gate_proj.weight"] = torch.zeros(I, H)  # another layer
    save_file(ckpt, str(tmp_path / "model.safetensors"))
    t0 = time.monotonic()
    results = run_local(_ep_four_ranks, 4, (str(tmp_path / "model.safetensors"),), timeout=120)
    assert [r["range"] for r in results] == [(0, 1), (1, 4), (4, 6), (6, 8)]
    for rank, res in enumerate(results):
        assert ("out0" in res) == (rank != 1) and ("empty0" in res) == (rank == 1)
        _assert_small(res, rank)
    assert time.monotonic() - t0 < 60


def test_data_parallel_ddp_equals_one_process_on_the_full_batch():
    try:
        import transformers  # noqa: F401
        with_hf = hasattr(transformers, "Qwen3MoeForCausalLM")
    except ImportError:
        with_hf = False
    results = run_local(_dp_worker, 2, (with_hf,), timeout=120)
    sums = [res.pop("experts_checksum") for res in results]
    assert sums[0] == sums[1]  # the replicas hold the same weights, bit for bit
    for rank, res in enumerate(results):
        if with_hf:
            assert res["hf_lora_tensors"] == 12
        _assert_small({k: v for k, v in res.items() if k != "hf_lora_tensors"}, rank)


def test_a_failing_rank_makes_every_rank_raise_and_the_group_survives():
    t0 = time.monotonic()
    r0, r1 = run_local(_failures, 2, timeout=60, collective_timeout=20)
    assert time.monotonic() - t0 < 30
    assert r1["bad_input"].startswith("own: ValueError") and "expert id 12" in r1["bad_input"]
    assert r0["bad_input"].startswith("peer:") and "rank 1" in r0["bad_input"]
    assert "expert id 12 out of range" in r0["bad_input"]
    assert r1["local_forward"].startswith("own: MemoryError")
    assert r0["local_forward"].startswith("peer:") and "injected failure" in r0["local_forward"]
    assert r1["local_backward"].startswith("own: ValueError") and "non-finite" in r1["local_backward"]
    assert r0["local_backward"].startswith("peer:") and "non-finite" in r0["local_backward"]
    assert r0["recovered"] and r1["recovered"]


def test_ranks_built_with_different_sizes_all_raise_before_any_exchange():
    results = run_local(_disagreeing_sizes, 2, timeout=60, collective_timeout=20)
    for rank, res in enumerate(results):
        assert res["hidden_size"].startswith("ValueError") and \
            f"hidden_size: rank 0 {H}, rank 1 {H + 16}" in res["hidden_size"], res
        assert res["r"].startswith("ValueError") and f"r: rank 0 {R}, rank 1 {R + 1}" in res["r"]
        assert res["recovered"]
    assert results[1]["refused"].startswith("ValueError") and "threads" in results[1]["refused"]
    assert results[0]["refused"].startswith("peer:") and "threads" in results[0]["refused"]


def test_a_rank_that_dies_outside_the_module_does_not_hang_the_others():
    t0 = time.monotonic()
    with pytest.raises(LocalRunError) as info:
        run_local(_dies_before_forward, 2, timeout=60, collective_timeout=5)
    errors = info.value.errors
    assert "KeyError" in errors[1]
    assert 0 in errors and "still running" not in errors[0]  # rank 0 raised by itself
    assert time.monotonic() - t0 < 40


# ---------------------------------------------------------------------------
# single-process pieces
# ---------------------------------------------------------------------------
def test_partition_checks_and_ranges():
    p = ExpertPartition(10, 4)
    assert p.counts == (3, 3, 2, 2) and p.range_of(2) == (6, 8)
    assert p.owner_table().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert ExpertPartition(8, 3, [1, 5, 2]).range_of(1) == (1, 6)
    with pytest.raises(ValueError, match="expert_counts=.*sums to 7"):
        ExpertPartition(8, 2, [3, 4])
    with pytest.raises(ValueError, match="at least one expert"):
        ExpertPartition(8, 2, [0, 8])
    with pytest.raises(ValueError, match="expert_counts has 3 entries"):
        ExpertPartition(8, 2, [2, 3, 3])
    with pytest.raises(ValueError, match="world_size=9"):
        ExpertPartition(8, 9)
    with pytest.raises(TypeError, match="expert_counts"):
        ExpertPartition(8, 2, ["a", "b"])


def test_module_needs_an_initialised_group():
    from ktsft.distributed import ExpertParallelLoRAExperts

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelLoRAExperts(E, K, H, I)


@pytest.mark.parametrize("world,T", [(3, 11), (4, 1), (2, 0)])
def test_routing_plans_move_every_pair_once(world, T):
    """plan_send / plan_recv with the all_to_all simulated in process: each
    (token, owner) row is sent once, each (token, expert) pair arrives at
    its owner with its weight and local id, and rows map back to tokens."""
    part = ExpertPartition(E, world, None)
    owner, first = part.owner_table(), torch.tensor(part.offsets[:-1])
    sends = []
    for src in range(world):
        g = torch.Generator().manual_seed(src)
        ids = (torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T
               else torch.zeros(0, K, dtype=torch.int64))
        w = torch.rand(T, K, generator=g)
        p = plan_send(ids, w, owner, first, world)
        # one row per (token, owner), not per (token, expert)
        assert len(p.send_tok) == len({(t, int(owner[ids[t, j]])) for t in range(T) for j in range(K)})
        assert sorted(p.pair_order.tolist()) == list(range(T * K))
        sends.append((ids, w, p))
    for dst in range(world):
        rows = [s[2].send_rows[dst] for s in sends]
        pairs = [s[2].send_pairs[dst] for s in sends]
        meta = torch.cat([s[2].meta[sum(s[2].send_pairs[:dst]):sum(s[2].send_pairs[:dst + 1])]
                          for s in sends])
        tok_recv = torch.cat([s[2].send_tok[sum(s[2].send_rows[:dst]):sum(s[2].send_rows[:dst + 1])]
                              for s in sends])
        src_of_row = torch.repeat_interleave(torch.arange(world), torch.tensor(rows))
        rp = plan_recv(meta, rows, pairs)
        got = sorted((int(src_of_row[r]), int(tok_recv[r]), int(l) + part.offsets[dst], float(wt))
                     for r, l, wt in zip(rp.row, rp.local_id, rp.weight))
        want = sorted((src, t, int(ids[t, j]), float(w[t, j])) for src, (ids, w, _) in enumerate(sends)
                      for t in range(T) for j in range(K) if int(owner[ids[t, j]]) == dst)
        assert got == want


def _write_shard(path, lo, hi, num_experts=E, r=R, alpha=8.0, layer=0):
    g = np.random.default_rng(lo)
    n = hi - lo
    mats = {"gate_lora_a": (n, r, H), "gate_lora_b": (n, I, r), "up_lora_a": (n, r, H),
            "up_lora_b": (n, I, r), "down_lora_a": (n, r, I), "down_lora_b": (n, H, r)}
    mats = {k: g.standard_normal(s).astype(np.float32) for k, s in mats.items()}
    save_adapter(path, {layer: mats}, r, alpha, expert_offset=lo,
                 extra_config={SHARD_KEY: {"rank": 0, "world_size": 1, "layers": {
                     str(layer): {"num_experts": num_experts, "experts": [lo, hi]}}}})


def test_merge_refuses_gaps_overlaps_and_mismatched_shards(tmp_path):
    _write_shard(tmp_path / "a", 0, 3)
    _write_shard(tmp_path / "b", 3, 8)
    _write_shard(tmp_path / "c", 2, 8)
    _write_shard(tmp_path / "d", 4, 8)
    _write_shard(tmp_path / "e", 3, 8, alpha=16.0)
    out = tmp_path / "out"
    cfg = merge_adapter_shards([tmp_path / "b", tmp_path / "a"], out)
    assert SHARD_KEY not in cfg
    from ktsft.adapters import load_adapter

    _, mats = load_adapter(out, 0, E, r=R)
    assert mats["gate_lora_a"].shape == (E, R, H)
    _, part = load_adapter(tmp_path / "b", 0, E, experts=[3, 5])
    assert np.array_equal(part["up_lora_b"], mats["up_lora_b"][[3, 5]])
    with pytest.raises(ValueError, match="overlaps"):
        merge_adapter_shards([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    with pytest.raises(ValueError, match="experts 3..3 out"):
        merge_adapter_shards([tmp_path / "a", tmp_path / "d"], tmp_path / "x")
    with pytest.raises(ValueError, match="experts 3..7 of 8 are in no shard"):
        merge_adapter_shards([tmp_path / "a"], tmp_path / "x")
    with pytest.raises(ValueError, match="config differs.*lora_alpha"):
        merge_adapter_shards([tmp_path / "a", tmp_path / "e"], tmp_path / "x")
    with pytest.raises(ValueError, match="not a ktsft expert shard"):
        merge_adapter_shards([out], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="experts: need distinct ids"):
        load_adapter(out, 0, E, experts=[1, 1])
