"""scripts/gpu_check.sh --cpu-smoke: the GPU machine's one command, with tiny shapes on CPU, so it
cannot rot between GPU loans (the tests in tests/gpu run, every benchmark method runs to a result)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path), "--cpu-smoke"], capture_output=True, text=True, timeout=900,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = ET.parse(tmp_path / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 5 and suite.get("failures") == "0" and suite.get("errors") == "0"
    bench = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = bench["results"]["tiny"]
    assert set(rows) == {"lift-torch", "lift-zero2", "lora-r16", "full"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 for r in rows.values()), rows
    assert "| lift-zero2 | ok |" in (tmp_path / "gpu_bench.md").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back from $OUT
