"""Code hygiene that is cheap to keep: ruff clean, and no family checks outside library/families/."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(__import__("sys").executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff not installed")
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_no_family_checks_in_shared_code():
    pattern = re.compile(r"\bif\b.*\b(is_sdxl|is_sd3|sdxl|sd3)\b")
    offenders = []
    for path in (ROOT / "library").rglob("*.py"):
        # families/ is where families differ; models/ holds one loader per checkpoint layout by design
        if "families" in path.parts or "models" in path.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders
