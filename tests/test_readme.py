"""Every Python code block of the README runs as written, each in a fresh
interpreter in an empty directory (the transformers ones on their tiny local
configs; nothing is downloaded)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
NEEDS = {"torch": "torch", "transformers": "transformers", "peft": "peft"}


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path):
    code = BLOCKS[i]
    for word, mod in NEEDS.items():
        if re.search(rf"\b(import|from) {word}\b|\b{word}\.", code):
            pytest.importorskip(mod)
    f = tmp_path / f"readme_block_{i}.py"
    f.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    r = subprocess.run([sys.executable, str(f)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
