"""python -m bench.e2e: whole-model training steps with the routed experts on
ktsft (host memory) and everything else on the GPU, beside the same model
entirely on the GPU with PEFT LoRA on its experts, in one run.

A MoE model of a named preset is built with random weights (on the GPU when
there is one), trained a few steps with LoRA r=16 on every routed expert,
and each step is broken down:

- ``kernel_fwd`` / ``kernel_bwd``: ktsft's native forward and backward;
- ``gpu_wait``: the experts calls waiting for GPU work queued before them
  (attention, router: the GPU's compute that nothing overlaps);
- ``transfers``: host<->device copies of activations and gradients;
- ``hidden``: in models with shared experts, the time the step's own thread
  spent on other work (the shared experts' Python and GPU kernels) while
  the routed experts' native forward ran on ktsft's worker thread: counted
  in ``kernel_fwd``, not in the step's wall time (``--overlap both`` runs
  the same steps without it beside, as ``..._serial``);
- ``optimizer``: ktsft.optim.CPUAdamW over the expert LoRA (host) and
  torch's AdamW over any GPU parameters;
- ``other``: the rest of the step (Python, kernel launches, the loss,
  zero_grad).

Beside it, the GPU baseline: the same model on the GPU, PEFT
``target_parameters`` LoRA on the experts (transformers' experts kernels),
where it fits.  Printed per step and written as JSON.

    python -m bench.e2e --preset qwen3-30b-a3b --tokens 512,2048      # a GPU machine
    python -m bench.e2e --preset tiny --device cpu --steps 2           # anywhere (a test runs it)
    python -m bench.e2e --help                                         # presets and their memory
    python -m bench.e2e plot RUN.json [RUN.json ...] --png OUT.png     # the breakdown figure
"""
if not __package__:  # run as a file: python path/to/bench/e2e.py
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import datetime
import gc
import json
import statistics
import time

from ktsft.__main__ import _available_memory

from . import memory
from .paths import add_out_argument, write_result

RANK = 16
GB = 1e9

# name: (model_type, layers (None: as many as host memory allows), config kwargs)
PRESETS = {
    "qwen3-30b-a3b": ("qwen3_moe", 48, dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=40960)),
    "deepseek-v3": ("deepseek_v3", None, dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, routed_scaling_factor=2.5,
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, first_k_dense_replace=0,
        norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=4096)),
    "tiny": ("qwen3_moe", 2, dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, tie_word_embeddings=False)),
    "tiny-deepseek": ("deepseek_v3", 2, dict(  # with a shared expert (the overlap's test)
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=16, n_group=4, topk_group=2,
        first_k_dense_replace=0, norm_topk_prob=True, tie_word_embeddings=False)),
}


def _shape(preset):
    kind, layers, kw = PRESETS[preset]
    E = kw.get("num_experts") or kw.get("n_routed_experts")
    return kind, layers, kw, E, kw["hidden_size"], kw["moe_intermediate_size"], kw[
        "num_experts_per_tok"]


def memory_per_layer(preset):
    """Host bytes per MoE layer on ktsft: bf16 expert weights, and the fp32
    LoRA with its gradient and two AdamW moments."""
    _, _, _, E, H, I, _ = _shape(preset)
    experts = 3 * E * H * I * 2
    lora = E * RANK * 3 * (H + I) * 4 * 4
    return experts, lora


def _help_presets():
    out = []
    for name in PRESETS:
        _, layers, _, E, H, I, k = _shape(name)
        ex, lo = memory_per_layer(name)
        depth = f"{layers} layers" if layers else "as many layers as host memory allows"
        total = f", {(ex + lo) * layers / GB:.0f} GB host" if layers else ""
        out.append(f"{name}: H={H}, I={I}, E={E}, k={k}, {depth}; per layer {ex / GB:.2f} GB "
                   f"experts (bf16) + {lo / GB:.2f} GB LoRA/grad/AdamW{total}; the GPU baseline "
                   f"holds the experts on the GPU")
    return "\n".join(out)


def auto_layers(preset, budget_fraction=0.8, reserve=12 * GB):
    ex, lo = memory_per_layer(preset)
    avail = _available_memory()
    if avail is None:
        return 1
    return max(1, int((budget_fraction * avail - reserve) // (ex + lo)))


def build(preset, layers, device, seed=0):
    """The model, random init, bf16, on `device`."""
    import torch
    import transformers

    kind, _, kw, *_ = _shape(preset)
    cfg = transformers.AutoConfig.for_model(kind, num_hidden_layers=layers, **kw)
    cfg.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.train()


class Clock:
    def __init__(self, device):
        import torch

        self.cuda = device != "cpu"
        self.torch = torch

    def now(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def _batches(vocab, T, n, device, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, T), generator=g).to(device) for _ in range(n)]


def train_ktsft(model, args, T, device):
    """Steps with the experts on ktsft; per-step breakdown."""
    import torch

    from ktsft.optim import CPUAdamW
    from ktsft.profile import StepProfile

    params = [p for p in model.parameters() if p.requires_grad]
    cpu = [p for p in params if p.device.type == "cpu"]
    other = [p for p in params if p.device.type != "cpu"]
    opt = CPUAdamW(cpu, lr=1e-4, weight_decay=0.0, threads=args.threads)
    opt_g = torch.optim.AdamW(other, lr=1e-4, weight_decay=0.0) if other else None
    clock = Clock(device)
    rows = []
    for i, ids in enumerate(_batches(model.config.vocab_size, T, args.steps + 1, device)):
        t0 = clock.now()
        with StepProfile() as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        t1 = clock.now()
        opt.step()
        if opt_g is not None:
            opt_g.step()
        t2 = clock.now()
        opt.zero_grad(set_to_none=True)
        if opt_g is not None:
            opt_g.zero_grad(set_to_none=True)
        t3 = clock.now()
        s = prof.seconds
        row = dict(step=i, tokens=T, step_s=t3 - t0, fwd_bwd_s=t1 - t0, optimizer_s=t2 - t1,
                   zero_grad_s=t3 - t2, kernel_fwd_s=s["kernel_fwd"], kernel_bwd_s=s["kernel_bwd"],
                   gpu_wait_s=s["gpu_wait"], transfers_s=s["d2h"] + s["h2d"],
                   staging_s=s["staging"], hidden_s=s["overlap"],
                   join_wait_s=s["join_wait"], loss=float(loss.item()),
                   rss=memory.rss(), peak_rss=memory.peak_rss())
        # the rest of the wall time; what ran hidden under the kernels is in
        # kernel_fwd already
        row["other_s"] = row["step_s"] - sum(row[k] for k in (
            "kernel_fwd_s", "kernel_bwd_s", "gpu_wait_s", "transfers_s", "staging_s",
            "optimizer_s")) + row["hidden_s"]
        row["outside_kernels"] = 1 - (row["kernel_fwd_s"] + row["kernel_bwd_s"]) / row["step_s"]
        rows.append(row)
        print(f"  ktsft T={T} step {i}{' (warm-up)' if i == 0 else ''}: {row['step_s']:.2f} s, "
              f"{T / row['step_s']:.0f} tok/s | kernels fwd {row['kernel_fwd_s']:.2f} bwd "
              f"{row['kernel_bwd_s']:.2f} | gpu wait {row['gpu_wait_s']:.2f} | transfers "
              f"{row['transfers_s']:.2f} | hidden {row['hidden_s']:.3f} | optimizer "
              f"{row['optimizer_s']:.2f} | other "
              f"{row['other_s']:.2f} | outside kernels {100 * row['outside_kernels']:.1f}% | "
              f"RSS {row['rss'] / GB:.1f} GB", flush=True)
    del opt, opt_g
    return rows


def train_gpu_peft(model, args, T, device):
    """The baseline: everything on the GPU, PEFT target_parameters LoRA on
    the experts; steps with torch's AdamW (fused)."""
    import torch

    clock = Clock(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0,
                            fused=device != "cpu")
    rows = []
    for i, ids in enumerate(_batches(model.config.vocab_size, T, args.steps + 1, device)):
        t0 = clock.now()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = clock.now()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = clock.now()
        rows.append(dict(step=i, tokens=T, step_s=t2 - t0, fwd_bwd_s=t1 - t0,
                         optimizer_s=t2 - t1, loss=float(loss.item())))
        print(f"  GPU+PEFT T={T} step {i}{' (warm-up)' if i == 0 else ''}: {t2 - t0:.2f} s, "
              f"{T / (t2 - t0):.0f} tok/s", flush=True)
    return rows


def _summary(rows, T):
    steady = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in steady) for k in steady[0]
           if isinstance(steady[0][k], float)}
    med["tokens_per_s"] = T / med["step_s"]
    return med


def run(args):
    import torch
    from peft import LoraConfig, get_peft_model

    import ktsft
    from ktsft.integrations.shared_experts import overlap_shared_experts
    from ktsft.integrations.transformers import apply_lora_experts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind, layers, *_ = _shape(args.preset)
    layers = args.layers or layers or auto_layers(args.preset)
    ex, lo = memory_per_layer(args.preset)
    res = dict(when=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               preset=args.preset, layers=layers, device=device, threads=args.threads,
               cpu=ktsft.cpu_info()["selected_isa"], rank=RANK,
               gpu=torch.cuda.get_device_name() if device != "cpu" else None,
               expert_bytes=ex * layers, lora_optimizer_bytes=lo * layers, runs={})
    print(f"bench.e2e: {args.preset}, {layers} layers, device {device}, {args.threads} threads, "
          f"ISA {res['cpu']}; experts {ex * layers / GB:.1f} GB + LoRA/grad/AdamW "
          f"{lo * layers / GB:.1f} GB on the host", flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.gpu_baseline and device != "cpu":
        t0 = time.time()
        try:
            model = build(args.preset, layers, device)
            res["gpu_build_s"] = time.time() - t0
            model = get_peft_model(model, LoraConfig(
                r=RANK, lora_alpha=2 * RANK,
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
            impl = getattr(model.config, "_experts_implementation", None)
            for T in tokens:
                torch.cuda.reset_peak_memory_stats()
                try:
                    rows = train_gpu_peft(model, args, T, device)
                    res["runs"][f"gpu_peft_T{T}"] = dict(
                        rows=rows, median=_summary(rows, T), experts_implementation=impl,
                        peak_gpu_bytes=torch.cuda.max_memory_allocated())
                except torch.OutOfMemoryError as e:
                    res["runs"][f"gpu_peft_T{T}"] = dict(error=f"out of GPU memory: {e}"[:300])
                    print(f"  GPU+PEFT T={T}: out of GPU memory", flush=True)
        except torch.OutOfMemoryError as e:
            res["gpu_baseline_error"] = f"the model does not fit on the GPU: {e}"[:300]
            print("  GPU+PEFT: the model does not fit on the GPU", flush=True)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    t0 = time.time()
    model = build(args.preset, layers, device)
    apply_lora_experts(model, r=RANK, alpha=2 * RANK, dtype="bf16", threads=args.threads)
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    res["ktsft_build_s"] = time.time() - t0
    res["rss_after_build"] = memory.rss()
    print(f"  built and moved the experts to ktsft in {res['ktsft_build_s']:.0f} s, RSS "
          f"{res['rss_after_build'] / GB:.1f} GB", flush=True)
    shared = overlap_shared_experts(model, enabled=args.overlap != "off")
    res["shared_expert_blocks"] = shared
    modes = [("", args.overlap != "off")]
    if args.overlap == "both" and shared:
        modes.append(("_serial", False))
    for T in tokens:
        for suffix, on in modes:
            overlap_shared_experts(model, enabled=on)
            if shared:
                print(f"  shared experts overlapped with the routed ones: {'yes' if on else 'no'}",
                      flush=True)
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats()
            rows = train_ktsft(model, args, T, device)
            # the activation cache of one step: one forward per layer awaits its backward
            cache = T * sum(m.wrapper.bytes_per_token() for m in model.modules()
                            if hasattr(m, "wrapper") and hasattr(m.wrapper, "bytes_per_token"))
            res["runs"][f"ktsft_T{T}{suffix}"] = dict(
                rows=rows, median=_summary(rows, T), overlap=bool(on and shared),
                peak_gpu_bytes=torch.cuda.max_memory_allocated() if device != "cpu" else 0,
                peak_rss=memory.peak_rss(), cache_bytes=cache)
    res["peak_rss"] = memory.peak_rss()
    _report(res, tokens)
    write_result(args.out, f"e2e_{args.preset}_L{layers}_{device}.json", res)
    return res


def _report(res, tokens):
    print(f"\n{'run':18s} {'tok/s':>7s} {'step s':>7s} {'kern fwd':>8s} {'kern bwd':>8s} "
          f"{'gpu wait':>8s} {'xfer':>6s} {'hidden':>6s} {'optim':>6s} {'other':>6s} "
          f"{'outside':>8s} {'GPU GB':>7s}")
    for T in tokens:
        for name in (f"ktsft_T{T}", f"ktsft_T{T}_serial", f"gpu_peft_T{T}"):
            r = res["runs"].get(name)
            if not r:
                continue
            if "error" in r:
                print(f"{name:18s} {r['error'][:60]}")
                continue
            m = r["median"]
            g = r.get("peak_gpu_bytes", 0) / GB
            if name.startswith("ktsft"):
                print(f"{name:18s} {m['tokens_per_s']:7.0f} {m['step_s']:7.2f} "
                      f"{m['kernel_fwd_s']:8.2f} {m['kernel_bwd_s']:8.2f} {m['gpu_wait_s']:8.2f} "
                      f"{m['transfers_s']:6.2f} {m.get('hidden_s', 0):6.3f} "
                      f"{m['optimizer_s']:6.2f} {m['other_s']:6.2f} "
                      f"{100 * m['outside_kernels']:7.1f}% {g:7.1f}")
            else:
                print(f"{name:18s} {m['tokens_per_s']:7.0f} {m['step_s']:7.2f} "
                      f"{'':8s} {'':8s} {'':8s} {'':6s} {'':6s} {m['optimizer_s']:6.2f} {'':6s} "
                      f"{'':8s} {g:7.1f}")
    bound = 1.15 * (res["expert_bytes"] + res["lora_optimizer_bytes"] + max(
        (r.get("cache_bytes", 0) for r in res["runs"].values() if isinstance(r, dict)),
        default=0))
    res["rss_bound"] = bound
    print(f"peak host RSS {res['peak_rss'] / GB:.1f} GB; bound 1.15 x (experts + LoRA/grad/"
          f"AdamW + activation cache) = {bound / GB:.1f} GB")


PARTS = (("kernel_fwd_s", "ktsft kernels, forward"), ("kernel_bwd_s", "ktsft kernels, backward"),
         ("gpu_wait_s", "waiting for the GPU"), ("transfers_s", "host<->GPU copies"),
         ("staging_s", "LoRA staging"), ("optimizer_s", "optimizer (CPUAdamW)"),
         ("other_s", "other (Python, launches, loss), not hidden under the kernels"))


def plot(results, path):
    """Stacked bars of the median step's breakdown, one per (preset,
    tokens) of the ktsft runs in `results` (bench.e2e JSON dicts), with
    tokens/s and the all-on-GPU baseline's tokens/s above each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for res in results:
        for name, run in res["runs"].items():
            if not name.startswith("ktsft_T") or "median" not in run:
                continue
            T, _, serial = name[len("ktsft_T"):].partition("_")
            gpu = res["runs"].get(f"gpu_peft_T{T}", {}).get("median")
            label = f"{res['preset']}\n{res['layers']} layers, {T} tok"
            if run.get("overlap") or serial:
                label += "\nshared overlapped" if run.get("overlap") else "\nshared serial"
            bars.append((label, run["median"], gpu))
    fig, ax = plt.subplots(figsize=(1.9 * len(bars) + 2, 4.6))
    for i, (label, m, gpu) in enumerate(bars):
        bottom = 0.0
        for j, (key, text) in enumerate(PARTS):
            v = m.get(key, 0.0) - (m.get("hidden_s", 0.0) if key == "other_s" else 0.0)
            v = max(v, 0.0)
            ax.bar(i, v, bottom=bottom, color=f"C{j}", label=text if i == 0 else None, width=0.6)
            bottom += v
        note = f"{m['tokens_per_s']:.0f} tok/s\n{100 * m['outside_kernels']:.0f}% outside kernels"
        if gpu:
            note += f"\n(all on GPU: {gpu['tokens_per_s']:.0f})"
        ax.text(i, bottom * 1.02, note, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("seconds per step (median)")
    ax.set_ylim(0, max(m["step_s"] for _, m, _ in bars) * 1.35)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("A training step with the routed experts on ktsft (host), the rest on the GPU",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    import sys

    from ktsft._contention import usable_cores

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:  # python -m bench.e2e plot RUN.json ... --png OUT.png
        i = argv.index("--png")
        files, png = argv[1:i], argv[i + 1]
        return plot([json.loads(open(f).read()) for f in files], png)

    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                 epilog="presets:\n" + _help_presets(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the preset's; deepseek-v3: as many as host "
                         "memory allows)")
    ap.add_argument("--tokens", default="512,2048",
                    help="tokens per step, comma-separated (one sequence each)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=usable_cores(),
                    help="ktsft's threads (the kernels and CPUAdamW)")
    ap.add_argument("--device", default=None, help="for the non-expert part (default: cuda "
                                                   "when there is one, else cpu)")
    ap.add_argument("--no-gpu-baseline", dest="gpu_baseline", action="store_false",
                    help="skip the all-on-GPU PEFT run")
    ap.add_argument("--overlap", choices=("on", "off", "both"), default="on",
                    help="shared experts on the GPU while the CPU computes the routed ones "
                         "(models with shared experts); both: the same steps without it "
                         "beside, as ktsft_T<tokens>_serial")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
