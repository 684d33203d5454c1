"""Re-render a run's markdown and plot from its JSON, measuring nothing:
``python -m bench.render RUN.json [--out DIR]``: DIR/<name>.md and .png, DIR
by default ./ktsft-bench-results (``--out bench/results`` to redraw the
tracked ones)."""

if not __package__:  # run as a file (python path/to/bench/render.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from . import paths, report


def render(path, out=None) -> Path:
    d = json.loads(Path(path).read_text())
    args = SimpleNamespace(**d["args"])
    out = paths.resolve_out(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / Path(path).stem
    text = report.full_text(d["machine"], d["ceilings"], d["peers"], args, d["rows"], d["elapsed_s"])
    with open(f"{stem}.md", "w") as f:
        f.write(text + "\n")
    report.plot(d["rows"], f"{stem}.png", report.title(d["machine"], args.threads, args.rank))
    return stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a run's JSON (e.g. bench/results/quick.json)")
    paths.add_out_argument(ap, "markdown and PNG")
    a = ap.parse_args(argv)
    stem = render(a.json, a.out)
    print(f"wrote {stem}.md" + (f", {stem}.png" if Path(f"{stem}.png").exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
