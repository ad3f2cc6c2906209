"""The README's "Every way of training" snippets run as pasted: Lightning's manual optimization, a plain loop,
Lightning Fabric, the Hugging Face Trainer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snippets() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Every way of training"):text.index("## The pieces")]
    found = {}
    for part in section.split("\n### ")[1:]:
        title = part.splitlines()[0].strip()
        code = re.search(r"```python\n(.*?)```", part, re.S)
        if code:
            found[title] = code.group(1)
    return found


def test_every_way_has_a_snippet() -> None:
    assert set(_snippets()) == {"Manual optimization in Lightning", "A plain PyTorch loop", "Lightning Fabric",
                                "Hugging Face `Trainer`"}


@pytest.mark.parametrize("title, outputs", [
    ("Manual optimization in Lightning", []),
    ("A plain PyTorch loop", ["runs/plain/laziness.png", "runs/plain/layers.png", "runs/plain/lazy_summary.txt"]),
    ("Lightning Fabric", ["runs/fabric/laziness.png"]),
    ("Hugging Face `Trainer`", ["runs/hf/laziness.png", "runs/hf/lazy_summary.txt"]),
])
def test_snippet_runs_as_pasted(title: str, outputs: list[str], tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(_snippets()[title])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "another objective" not in output, output[-3000:]
    for path in outputs:
        assert (tmp_path / path).stat().st_size > 0, path
    if title != "Manual optimization in Lightning":
        assert "Regime:" in done.stdout
