"""Where bench writes its results, and how its scripts run from anywhere.

Results go to ``--out`` when given, else to ``./ktsft-bench-results`` in
the current directory: never into the tracked ``bench/results/`` (the runs
docs/performance.md cites) unless ``--out bench/results`` asks for it.

bench is not an installed package.  ``python -m bench`` works from any
directory with the repository on ``sys.path`` (its root as the current
directory, or ``PYTHONPATH=/path/to/repo``); ``python /path/to/repo/bench``
and ``python /path/to/repo/bench/<script>.py`` work too: each script starts
with the lines below, which make it the module ``bench.<script>`` of the
repository it lives in (so its relative imports and ``import ktsft`` of an
in-place build resolve there, whatever the current directory)::

    if not __package__:  # run as a file: python path/to/bench/<script>.py
        import os as _os, sys as _sys
        _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
        from bench.paths import as_package
        __package__ = as_package(__file__)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_DIRNAME = "ktsft-bench-results"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRACKED = HERE / "results"


def default_out() -> Path:
    """./ktsft-bench-results, in the directory bench runs from."""
    return Path.cwd() / DEFAULT_DIRNAME


def add_out_argument(parser, what: str = "JSON and markdown") -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"directory for the {what} (default: {DEFAULT_DIRNAME}/ in the "
                             "current directory; the tracked bench/results/ is written only when "
                             "given as --out)")


def resolve_out(out) -> Path:
    """The directory to write to: `out` as given, else default_out()."""
    return Path(out) if out is not None else default_out()


def write_result(out, name: str, result) -> Path:
    """`result` as indented JSON in resolve_out(out)/name (made if missing);
    prints and returns the path."""
    import json

    d = resolve_out(out)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def as_package(file: str) -> str:
    """For a script run as a file: drop its own directory from sys.path
    (bench's modules are not top-level modules: bench/data.py must not
    shadow a package called data), put the repository root where the
    script's directory was -- after any PYTHONPATH entries, so that
    ``PYTHONPATH=<build> python bench/ab.py`` still times that build --
    import the package, and return the name to set as __package__."""
    here = os.path.dirname(os.path.abspath(file))
    root = os.path.dirname(here)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (here, root)]
    env = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    at = max((i + 1 for i, p in enumerate(sys.path) if p and os.path.abspath(p) in env), default=0)
    sys.path.insert(at, root)
    import bench  # noqa: F401

    return "bench"
