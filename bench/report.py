"""Output: the markdown table, the JSON record and the PNG plot."""
from __future__ import annotations

import json
import math

import numpy as np

from .contention import CONTENDED
from .metrics import LORA_FLOPS_NOTE, bf16_hardware


def _f(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


# (header, how to render one row)
COLUMNS = (
    ("preset", lambda r: r["preset"]),
    ("T", lambda r: str(r["T"])),
    ("dtype", lambda r: r["dtype"]),
    ("isa", lambda r: r["isa"]),
    ("routing", lambda r: r["routing"]),
    ("fwd ms", lambda r: _f(r["fwd_ms"], ".1f")),
    ("bwd ms", lambda r: _f(r["bwd_ms"], ".1f")),
    ("tok/s", lambda r: _f(r["tok_s"], ".0f")),
    ("GFLOP/s", lambda r: _f(r["gflops"], ".0f")),
    ("% GEMM peak", lambda r: _f(100 * r["frac_peak"], ".0f")),
    ("weight GB/s", lambda r: _f(r["gbs"], ".1f")),
    ("% read BW", lambda r: _f(100 * r["frac_bw"], ".0f")),
    ("roofline ms", lambda r: f"{r['roofline_ms']:.1f} ({r['bound'][:3]})"),
    ("roofline eff", lambda r: _f(100 * r["roofline_eff"], ".0f") + "%"),
    ("x eager", lambda r: _f(r["speedup_eager"], ".1f")),
    ("x grouped_mm", lambda r: _f(r["speedup_grouped_mm"], ".1f")),
    ("weights MB", lambda r: _f(r.get("weights_mb"), ".0f")),
    ("extra MB (grads)", lambda r: f"{r['extra_mb']:.0f} ({r['lora_grad_mb']:.0f})"),
    ("call µs fwd/bwd", lambda r: f"{r['py_fwd_us']:.0f}/{r['py_bwd_us']:.0f}"),
    ("max rel err", lambda r: "n/a" if r["check"] is None else
     f"{r['check']['max_rel_err']:.1e}" + ("" if r["check"]["ok"] else " FAIL")),
    ("other load", lambda r: _f(r["other_load"], ".2f")),
)


def markdown_table(rows) -> str:
    head = "| " + " | ".join(h for h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt(r) for _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def peer_table(rows) -> str:
    """The peers' own times, once per (preset, T, dtype, routing), with the
    other processes' load while each was measured."""
    seen = set()
    lines = ["| preset | T | dtype | routing | eager fwd ms | eager bwd ms | eager other load | "
             "grouped_mm fwd ms | grouped_mm bwd ms | grouped_mm other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["preset"], r["T"], r["dtype"], r["routing"])
        if key in seen:
            continue
        seen.add(key)
        cells = []
        for peer in ("eager", "grouped_mm"):
            p = r.get(peer)
            cells += ([_f(p["fwd_ms"], ".1f"), _f(p["bwd_ms"], ".1f"), _f(p["other_load"], ".2f")]
                      if p else ["n/a"] * 3)
        lines.append(f"| {r['preset']} | {r['T']} | {r['dtype']} | {r['routing']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_text(info, ceil, peer_status, args, rows, elapsed) -> str:
    """Header lines (machine, ceilings, counting rules), the main table and
    the peers' own times."""
    gemm = "; ".join(
        f"{d} {v:.0f} GFLOP/s (" + ", ".join(f"{lib} {x:.0f}" for lib, x in
                                             ceil["gemm_by_library"][d].items()) + ")"
        for d, v in ceil["gemm_gflops"].items())
    if "bf16" in {r["dtype"] for r in rows} and not bf16_hardware():
        gemm += " (bf16 rows use the fp32 peak: no bf16 hardware, bf16 runs on fp32 FMA)"
    head = [
        f"machine: {info['cpu_model']}, {info['usable_cores']} usable cores, "
        f"{info['mem_total_gib']} GiB, torch {info['torch']}, ktsft {info['ktsft']}, {info['date']}",
        f"ceilings at {args.threads} threads (best of start and end of run): GEMM {gemm}; "
        f"read bandwidth {ceil['read_gbs']:.1f} GB/s",
        f"FLOPs: base 12*H*I per (token, expert) pair; {LORA_FLOPS_NOTE}; rank {args.rank}",
        "peers: " + ", ".join(f"{k} {v}" for k, v in peer_status.items()),
        f"ktsft: median of {args.repeats} steps after 1 warm-up; peers: median of "
        f"{args.peer_repeats} after 1 warm-up; sweep took {elapsed:.0f} s",
    ]
    parts = head + ["", markdown_table(rows)]
    if any(r.get("eager") for r in rows):
        parts += ["", "PyTorch peers (fwd / bwd ms):", "", peer_table(rows)]
    return "\n".join(parts)


def write_all(stem, text: str, rows, payload: dict, title: str) -> None:
    """stem.md (the text), stem.json (everything), stem.png (the plot)."""
    with open(f"{stem}.md", "w") as f:
        f.write(text + "\n")
    write_json(f"{stem}.json", payload)
    plot(rows, f"{stem}.png", title)


def write_json(path, payload: dict) -> None:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(type(o).__name__)

    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=default)
        f.write("\n")


def title(info: dict, threads: int, rank: int) -> str:
    return (f"ktsft vs PyTorch, {info['cpu_model']}, {threads} threads, LoRA rank {rank}, "
            f"{info['date'][:10]}")


def plot(rows, path, title: str) -> None:
    """Per preset: fwd+bwd time against T for ktsft, the peers and the
    roofline (left), and ktsft's roofline efficiency (right).  Without
    matplotlib (the bench extra) no plot, with a note: the table and the
    JSON hold every number."""
    try:
        import matplotlib
    except ImportError:
        import sys

        print(f"matplotlib not installed: no plot ({path}); pip install matplotlib",
              file=sys.stderr)
        return

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(len(presets), 2, figsize=(13, 4.6 * len(presets)), squeeze=False)
    colors = {"bf16": "tab:blue", "fp32": "tab:orange"}
    styles = ["-", "-.", (0, (3, 1, 1, 1)), (0, (1, 1))]  # one per (isa, routing)
    for (ax_t, ax_e), preset in zip(axes, presets):
        rs = [r for r in rows if r["preset"] == preset]
        isas = list(dict.fromkeys(r["isa"] for r in rs))
        routings = list(dict.fromkeys(r["routing"] for r in rs))
        combos = [(i, rt) for i in isas for rt in routings]
        for dtype in dict.fromkeys(r["dtype"] for r in rs):
            c = colors.get(dtype)
            for isa, rt in combos:
                sel = sorted((r for r in rs if (r["dtype"], r["isa"], r["routing"]) == (dtype, isa, rt)),
                             key=lambda r: r["T"])
                if not sel:
                    continue
                T = [r["T"] for r in sel]
                tag = " ".join([dtype] + [isa] * (len(isas) > 1) + [rt] * (len(routings) > 1))
                ls = styles[combos.index((isa, rt)) % len(styles)]
                hollow = {"markerfacecolor": "none"} if rt == "skewed" else {}
                ax_t.plot(T, [r["fwd_ms"] + r["bwd_ms"] for r in sel], linestyle=ls, marker="o",
                          color=c, label=f"ktsft {tag}", **hollow)
                ax_e.plot(T, [100 * r["roofline_eff"] for r in sel], linestyle=ls, marker="o",
                          color=c, label=f"ktsft {tag}", **hollow)
                if isa != isas[0]:
                    continue  # roofline and peers do not depend on the isa
                ptag = " ".join([dtype] + [rt] * (len(routings) > 1))
                ax_t.plot(T, [r["roofline_ms"] for r in sel], ":", color=c, label=f"roofline {ptag}")
                for peer, marker in (("eager", "s"), ("grouped_mm", "^")):
                    pts = [(r["T"], r[peer]["fwd_ms"] + r[peer]["bwd_ms"]) for r in sel if r.get(peer)]
                    if pts:
                        ax_t.plot(*zip(*pts), "--", marker=marker, color=c, alpha=0.6,
                                  label=f"{peer} {ptag}", **hollow)
        _ring_contended(ax_t, ax_e, rs)
        ax_t.set(xscale="log", yscale="log", xlabel="tokens per step (T)",
                 ylabel="forward + backward ms", title=f"{preset}: step time")
        top = max(100, *(110 * r["roofline_eff"] for r in rs))  # >100% = a ceiling measured low
        ax_e.set(xscale="log", xlabel="tokens per step (T)", ylabel="roofline time / ktsft time (%)",
                 title=f"{preset}: roofline efficiency", ylim=(0, top))
        for ax in (ax_t, ax_e):
            qlens = sorted({r["T"] for r in rs})
            ax.set_xticks(qlens, [str(t) for t in qlens])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2 if len(combos) > 1 else 1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ring_contended(ax_t, ax_e, rows) -> None:
    """Grey rings around points measured while other processes were busy."""
    kw = dict(s=260, facecolors="none", edgecolors="grey", linewidths=1.5, zorder=5)
    label = f"other processes busy (> {CONTENDED} core)"
    pts_t, pts_e = [], []
    for r in rows:
        if r["other_load"] > CONTENDED:
            pts_t.append((r["T"], r["fwd_ms"] + r["bwd_ms"]))
            pts_e.append((r["T"], 100 * r["roofline_eff"]))
        for peer in ("eager", "grouped_mm"):
            p = r.get(peer)
            if p and p["other_load"] > CONTENDED:
                pts_t.append((r["T"], p["fwd_ms"] + p["bwd_ms"]))
    for ax, pts in ((ax_t, pts_t), (ax_e, pts_e)):
        if pts:
            ax.scatter(*zip(*sorted(set(pts))), label=label, **kw)
