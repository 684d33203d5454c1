"""Adapters of expert-parallel runs: each rank writes a shard (a PEFT
per-expert adapter holding its experts under their global ids, plus a
``ktsft_expert_shard`` config entry saying which), and
``merge_adapter_shards`` joins the shards of all ranks into one ordinary
PEFT adapter.  Needs no torch.distributed: merging runs anywhere the shard
directories can be read."""
from __future__ import annotations

import os
import re

from ..adapters import _read, _write_adapter, save_adapter
from ..schema import LORA_NAMES as PARAM_NAMES

SHARD_KEY = "ktsft_expert_shard"
_KEY = re.compile(r"layers\.(\d+)\..*?\.experts\.(\d+)\.[^.]+\.lora_[AB]\.weight$")


def _is_ep(m) -> bool:
    """An expert-parallel layer (duck-typed: this module imports no front end)."""
    return hasattr(m, "expert_range") and callable(getattr(m, "lora_parameters", None))


def _ep_modules(modules):
    if _is_ep(modules):
        return [modules]
    if hasattr(modules, "modules"):  # a model holding expert-parallel layers
        return [m for m in modules.modules() if _is_ep(m)]
    return list(modules)


def save_adapter_shard(path, modules, **kw) -> None:
    """Write this rank's LoRA of `modules` (ExpertParallelLoRAExperts, a
    list of them, or a model holding them) as a shard adapter directory.
    Keyword arguments go to ktsft.adapters.save_adapter (block, proj_names,
    model_prefix, base_model_name_or_path, dtype)."""
    mods = _ep_modules(modules)
    if not mods:
        raise ValueError("save_adapter_shard: no ExpertParallelLoRAExperts module given")
    hyper = {(m.r, m.alpha, m.use_rslora, m.lora_dropout) for m in mods}
    if len(hyper) > 1:
        raise ValueError(f"modules differ in (r, alpha, use_rslora, lora_dropout): "
                         f"{sorted(hyper)}; one adapter config holds one")
    layers, offsets, ranges = {}, {}, {}
    for m in mods:
        L = m.layer_idx
        if L in layers:
            raise ValueError(f"two modules have layer_idx {L}")
        layers[L] = {n: p.detach() for n, p in zip(PARAM_NAMES, m.lora_parameters())}
        lo, hi = m.expert_range
        offsets[L] = lo
        ranges[str(L)] = {"num_experts": m.num_experts, "experts": [lo, hi]}
    r, alpha, rslora, dropout = hyper.pop()
    shard = {"rank": mods[0].rank, "world_size": mods[0].world_size, "layers": ranges}
    kw.setdefault("lora_dropout", dropout)
    save_adapter(path, layers, r, alpha, use_rslora=rslora, expert_offset=offsets,
                 extra_config={SHARD_KEY: shard}, **kw)


def merge_adapter_shards(paths, out_path) -> dict:
    """Join shard adapters (one per rank, any order) into one PEFT adapter
    at `out_path`, written atomically.  Checks that the shards agree on the
    config (rank, alpha, target modules, layers) and that, for every layer,
    their expert ranges tile [0, num_experts) exactly and each shard holds
    exactly the keys of its range.  Returns the merged config."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("merge_adapter_shards: paths is empty")
    base, tensors, cover = None, {}, {}  # cover: layer -> [(lo, hi, E, path)]
    for p in paths:
        config, ts = _read(p)
        shard = config.pop(SHARD_KEY, None)
        if not isinstance(shard, dict) or not isinstance(shard.get("layers"), dict):
            raise ValueError(f"{p}: not a ktsft expert shard (no {SHARD_KEY!r} in its "
                             "adapter_config.json)")
        if base is None:
            base, first = config, p
        elif config != base:
            diff = sorted(k for k in set(config) | set(base) if config.get(k) != base.get(k))
            raise ValueError(f"{p}: adapter config differs from {first}'s in {diff}")
        seen = {}
        for key in ts:
            m = _KEY.search(key)
            if m is None:
                raise ValueError(f"{p}: key {key!r} is not a per-expert LoRA key")
            L, e = m.group(1), int(m.group(2))
            if L not in shard["layers"]:
                raise ValueError(f"{p}: key {key!r} is in layer {L}, which the shard does not list")
            lo, hi = shard["layers"][L]["experts"]
            if not lo <= e < hi:
                raise ValueError(f"{p}: key {key!r} is outside the shard's experts {lo}..{hi - 1}")
            seen[L] = seen.get(L, 0) + 1
        for L, info in shard["layers"].items():
            lo, hi = info["experts"]
            if seen.get(L, 0) != 6 * (hi - lo):
                raise ValueError(f"{p}: layer {L} has {seen.get(L, 0)} LoRA tensors, experts "
                                 f"{lo}..{hi - 1} need {6 * (hi - lo)}")
            cover.setdefault(L, []).append((lo, hi, int(info["num_experts"]), p))
        tensors.update(ts)
    for L, parts in sorted(cover.items(), key=lambda kv: int(kv[0])):
        parts.sort()
        E = {n for _, _, n, _ in parts}
        if len(E) > 1:
            raise ValueError(f"layer {L}: shards disagree on num_experts: {sorted(E)}")
        E, at = E.pop(), 0
        for lo, hi, _, p in parts:
            if lo != at:
                what = "overlaps the previous shard" if lo < at else f"leaves experts {at}..{lo - 1} out"
                raise ValueError(f"layer {L}: shard {p} (experts {lo}..{hi - 1}) {what}")
            at = hi
        if at != E:
            raise ValueError(f"layer {L}: experts {at}..{E - 1} of {E} are in no shard")
    _write_adapter(out_path, tensors, base)
    return base
