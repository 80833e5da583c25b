"""The README's Python API example runs as written, right after `make demo` (an earlier bundle in its way)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO


def api_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("The Python API mirrors the CLI", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block after 'The Python API mirrors the CLI'"
    return match.group(1)


def test_the_example_is_the_one_we_run() -> None:
    code = api_example()
    assert "edgecompress.build(" in code and "force=True" in code
    compile(code, "README.md", "exec")


@pytest.mark.slow
def test_readme_api_example_runs_after_a_previous_build(minilm_phone_bundle: Path, tmp_path: Path) -> None:
    code = api_example()
    out = re.search(r'out="([^"]+)"', code)
    assert out, "the example names its out="
    # an earlier run of the example left a bundle where it writes (after `make demo`, build/ holds the demo's too)
    shutil.copytree(minilm_phone_bundle, tmp_path / out.group(1))
    before = json.loads((tmp_path / out.group(1) / "manifest.json").read_text())["created"]
    time.sleep(1.1)  # `created` has 1 s resolution
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    head, size, cosine = r.stdout.strip().rsplit(" ", 2)  # print(m.passed, misses, size_mb, cosine_mean)
    assert head == "True []" and 15 < float(size) < 30 and float(cosine) > 0.99, r.stdout  # within every budget
    assert (tmp_path / out.group(1) / "model.ort").is_file()  # phone-arm64: the ORT Mobile package
    assert json.loads((tmp_path / out.group(1) / "manifest.json").read_text())["created"] != before  # replaced
