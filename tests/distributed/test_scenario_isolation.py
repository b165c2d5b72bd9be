"""A shared 2-rank job reports per scenario: a failing scenario fails its own tests and no others.

A generated test module runs one job of four scenarios through tests/distributed/launch.py: one that
trains, one that raises (the single-process torch backend under 2 ranks), one that kills the whole
job, and one after it that never runs. Run by pytest in a subprocess, exactly the tests of the
failing and unreached scenarios fail, each naming its scenario and why; the good one passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from .launch import REPO

pytestmark = pytest.mark.slow

MODULE = textwrap.dedent("""
    import pytest
    from distributed.launch import torchrun

    GOOD = {"config": {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "zero_optimization": {"stage": 2},
                       "lift": {"backend": "deepspeed", "total_steps": 4}}, "optimizer": "sgd", "steps": 4}
    BAD = {**GOOD, "config": {**GOOD["config"], "lift": {"backend": "torch", "total_steps": 4}}}
    SCENARIOS = {"good": GOOD, "bad": BAD, "crash": {**GOOD, "crash": True}, "after": GOOD}


    @pytest.fixture(scope="module")
    def res(tmp_path_factory):
        return torchrun(SCENARIOS, tmp_path_factory.mktemp("job"), "shared", timeout=300)


    def test_good(res):
        assert len(res["good"]["losses"]) == 4


    def test_bad(res):
        assert len(res["bad"]["losses"]) == 4


    def test_crash(res):
        assert len(res["crash"]["losses"]) == 4


    def test_after(res):
        assert len(res["after"]["losses"]) == 4
""")


def test_a_failing_scenario_fails_only_its_own_tests(tmp_path):
    import xml.etree.ElementTree as ET

    (tmp_path / "test_shared_job.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            str(tmp_path / "test_shared_job.py"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcome = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = case.find("failure")
        assert case.find("error") is None, (
            f"{case.get('name')}: an error (a shared fixture failed?), not a failure of its own"
        )
        outcome[case.get("name")] = "passed" if bad is None else (bad.get("message", "") + (bad.text or ""))
    assert outcome["test_good"] == "passed", outcome["test_good"]
    assert set(outcome) == {"test_good", "test_bad", "test_crash", "test_after"}, outcome
    assert (
        "scenario 'bad' failed" in outcome["test_bad"]
        and 'lift.backend: "torch" is single-process' in outcome["test_bad"]
    )
    assert "scenario 'crash' produced no result: the job ended (exit" in outcome["test_crash"]
    assert "scenario 'after' produced no result" in outcome["test_after"]
    assert re.search(r"\b3 failed, 1 passed\b", proc.stdout), proc.stdout[-3000:]
