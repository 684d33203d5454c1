"""``python -m bench``: see bench/run.py."""

if not __package__:  # run as a file (python path/to/bench): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import sys

from .run import main

sys.exit(main())
