"""End to end on a GPU machine: a Qwen3-30B-A3B-shaped checkpoint on disk ->
``load_moe_checkpoint`` (routed experts into host memory, one expert at a
time; the rest to the GPU) -> PEFT LoRA on attention (GPU) and on the experts
(``target_parameters``, trained by the 'ktsft' experts implementation) ->
a few ``Trainer`` steps.  Reports tokens/s, peak GPU memory and peak host RSS
against the expert bytes.

    python -m bench.hf_e2e write --dir /tmp/q3 [--layers 48]      # random weights, fp8 experts
    python -m bench.hf_e2e train --dir /tmp/q3 --steps 4 --seq 1024 --accum 2 --out r.json

The checkpoint has the hub's per-expert layout with the experts in fp8 e4m3
and 128x128 ``weight_scale_inv`` blocks (as Qwen3-30B-A3B-FP8 / DeepSeek-V3
ship them; 29 GB instead of 58), everything else bf16.  The loader
dequantizes the experts to bf16 storage, so the host holds 58 GB of experts.
"""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/hf_e2e.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import json
import math
import os
import sys
import time

from . import memory


def qwen3_30b_config(layers):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, torch_dtype="bfloat16")


def write(args):
    """Random weights straight into safetensors shards (one per layer), made
    on the GPU when there is one; never a whole model in memory."""
    import torch
    from safetensors.torch import save_file

    cfg = qwen3_30b_config(args.layers)
    os.makedirs(args.dir, exist_ok=True)
    cfg.save_pretrained(args.dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def lin(o, i, std=0.02):
        return (torch.randn(o, i, generator=g, device=dev) * std).to(torch.bfloat16).cpu()

    def fp8(o, i):
        # q ~ N(0, 64) in e4m3 (|q| < 448), one scale per 128x128 block: w ~ N(0, 0.02^2)
        q = (torch.randn(o, i, generator=g, device=dev) * 64).clamp_(-440, 440)
        s = torch.full((math.ceil(o / 128), math.ceil(i / 128)), 0.02 / 64, device=dev)
        return q.to(torch.float8_e4m3fn).cpu(), s.cpu()

    weight_map, t0 = {}, time.time()

    def shard(name, tensors):
        save_file(tensors, os.path.join(args.dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    n_shards = args.layers + 1
    shard(f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors",
          {"model.embed_tokens.weight": lin(cfg.vocab_size, H),
           "lm_head.weight": lin(cfg.vocab_size, H),
           "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)})
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        t = {p + "self_attn.q_proj.weight": lin(nq * hd, H), p + "self_attn.k_proj.weight":
             lin(nkv * hd, H), p + "self_attn.v_proj.weight": lin(nkv * hd, H),
             p + "self_attn.o_proj.weight": lin(H, nq * hd),
             p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
             p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "mlp.gate.weight": lin(E, H)}
        for e in range(E):
            for proj, (o, i) in (("gate_proj", (I, H)), ("up_proj", (I, H)),
                                 ("down_proj", (H, I))):
                q, s = fp8(o, i)
                t[f"{p}mlp.experts.{e}.{proj}.weight"] = q
                t[f"{p}mlp.experts.{e}.{proj}.weight_scale_inv"] = s
        shard(f"model-{layer + 1:05d}-of-{n_shards:05d}.safetensors", t)
        print(f"layer {layer + 1}/{args.layers} written ({time.time() - t0:.0f} s)", flush=True)
    with open(os.path.join(args.dir, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir))
    print(f"checkpoint: {size / 1e9:.1f} GB in {time.time() - t0:.0f} s", flush=True)


def _instrument():
    """Wall time per step in ktsft's forward and backward calls (staging
    copies included) and in the LoRA staging of the 'ktsft' experts."""
    import ktsft.torch as kt
    from ktsft.integrations import hf_experts

    acc = {"experts_fwd": 0.0, "experts_bwd": 0.0, "lora_staging": 0.0, "optimizer": 0.0}

    def timed(fn, key):
        def f(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.time() - t
        return f

    kt._run_forward = timed(kt._run_forward, "experts_fwd")
    kt._run_backward = timed(kt._run_backward, "experts_bwd")
    hf_experts._Staging.lora_arrays = timed(hf_experts._Staging.lora_arrays, "lora_staging")
    return acc


def train(args):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import ktsft
    from ktsft.integrations.checkpoint import load_moe_checkpoint
    from ktsft.integrations.transformers import configure

    res = {"cpu": ktsft.cpu_info()["selected_isa"], "threads": args.threads,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    rss0 = memory.rss()
    t0 = time.time()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_moe_checkpoint(args.dir, dtype=torch.bfloat16, device=dev)
    res["load_s"] = time.time() - t0
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    ebytes = sum(m.gate_up_proj.numel() * m.gate_up_proj.element_size()
                 + m.down_proj.numel() * m.down_proj.element_size() for m in experts)
    res["expert_bytes"] = ebytes
    res["rss_after_load"] = memory.rss()
    res["peak_rss_load"] = memory.peak_rss()
    print(f"loaded in {res['load_s']:.0f} s: experts {ebytes / 2**30:.1f} GiB on "
          f"{experts[0].gate_up_proj.device}, RSS {res['rss_after_load'] / 2**30:.1f} GiB, "
          f"peak {res['peak_rss_load'] / 2**30:.1f} GiB", flush=True)
    timing = _instrument()
    configure(model, threads=args.threads)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    res["rss_after_peft"], res["peak_rss_peft"] = memory.rss(), memory.peak_rss()
    cpu_lora = sum(p.numel() for p in model.parameters() if p.requires_grad and p.device.type == "cpu")
    gpu_lora = sum(p.numel() for p in model.parameters() if p.requires_grad and p.device.type != "cpu")
    res["lora_params_cpu"], res["lora_params_gpu"] = cpu_lora, gpu_lora
    # fp32 param + grad + two AdamW moments
    res["lora_opt_bytes_cpu"] = cpu_lora * 4 * 4

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 151936, (args.seq,), generator=g)
            return {"input_ids": ids, "labels": ids}

    times = []
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    stages = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            sync()
            self.t = time.time()
            timing.update({k: 0.0 for k in timing})

        def on_pre_optimizer_step(self, a, state, control, **k):
            sync()
            self.o = time.time()

        def on_optimizer_step(self, a, state, control, **k):
            sync()
            timing["optimizer"] = time.time() - self.o

        def on_step_end(self, a, state, control, **k):
            sync()
            times.append(time.time() - self.t)
            stages.append({"step_s": times[-1], **dict(timing), "rss": memory.rss(),
                           "peak_rss": memory.peak_rss()})
            print(f"step {state.global_step}: {times[-1]:.2f} s  " + "  ".join(
                f"{k} {v:.2f}" for k, v in timing.items()) +
                f"  RSS {stages[-1]['rss'] / 2**30:.1f} GiB (peak "
                f"{stages[-1]['peak_rss'] / 2**30:.1f})", flush=True)

    losses = []

    class Log(transformers.TrainerCallback):
        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    targs = transformers.TrainingArguments(
        output_dir="/tmp/hf_e2e_out", per_device_train_batch_size=1,
        gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, bf16=cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0, gradient_checkpointing=args.ckpt)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr = transformers.Trainer(model=model, args=targs, train_dataset=Data(),
                              callbacks=[Clock(), Log()])
    tr.train()
    tok = args.seq * args.accum
    steady = times[1:] if len(times) > 1 else times
    res.update(steps=len(times), tokens_per_step=tok, step_s=times,
               tokens_per_s=tok / (sum(steady) / len(steady)), losses=losses,
               peak_gpu_alloc=torch.cuda.max_memory_allocated() if cuda else 0,
               peak_gpu_reserved=torch.cuda.max_memory_reserved() if cuda else 0,
               peak_rss=memory.peak_rss(), rss_start=rss0, stages=stages)
    bound = 1.15 * ebytes + res["lora_opt_bytes_cpu"]
    res["rss_bound"] = bound
    res["rss_ok"] = res["peak_rss"] <= bound
    res["gpu_ok"] = res["peak_gpu_reserved"] <= 10 * 2**30
    print(json.dumps({k: v for k, v in res.items() if k != "step_s"}, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.hf_e2e")
    ap.add_argument("what", choices=["write", "train"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--device", default=None, help="for the non-expert part (default: cuda if any)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    (write if args.what == "write" else train)(args)


if __name__ == "__main__":
    sys.exit(main())
