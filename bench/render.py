"""Re-render a run's markdown and plot from its JSON, measuring nothing:
``python -m bench.render bench/results/quick.json``."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from . import report


def main(path: str) -> None:
    d = json.loads(Path(path).read_text())
    args = SimpleNamespace(**d["args"])
    stem = Path(path).with_suffix("")
    text = report.full_text(d["machine"], d["ceilings"], d["peers"], args, d["rows"], d["elapsed_s"])
    with open(f"{stem}.md", "w") as f:
        f.write(text + "\n")
    report.plot(d["rows"], f"{stem}.png", report.title(d["machine"], args.threads, args.rank))


if __name__ == "__main__":
    main(sys.argv[1])
