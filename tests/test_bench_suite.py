"""The documented benchmark regression command collects and runs the ``bench_*.py`` suites."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("bench_cache.py", "bench_planning.py", "bench_quant.py")
REGRESSION_CMD = "pytest bench/ --benchmark-only --benchmark-json=new.json"


def _pytest(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # a test session run with pytest-xdist leaves its traces in the environment, under which
    # pytest-benchmark disables timing: the child runs as a plain session, as a user would
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_dir_collects_every_suite() -> None:
    res = _pytest("--collect-only", "-q", "bench/")
    assert res.returncode == 0, res.stdout + res.stderr
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    assert ids, res.stdout
    for suite in SUITES:
        assert any(line.startswith(f"bench/{suite}::") for line in ids), suite
    count = re.search(r"(\d+) tests? collected", res.stdout)
    assert count is not None and int(count.group(1)) == len(ids)
    # an explicit file is collected once, not twice
    one = _pytest("--collect-only", "-q", "bench/bench_quant.py", "bench/")
    assert one.returncode == 0 and len([x for x in one.stdout.splitlines() if "::" in x]) == len(
        ids
    )


def test_regression_command_writes_the_json(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert REGRESSION_CMD in readme and REGRESSION_CMD in makefile
    out = tmp_path / "new.json"
    args = REGRESSION_CMD.split()[1:-1]  # the README's options, then our JSON path
    # one quick case keeps this cheap; the rest of the command is the documented one
    res = _pytest(*args, f"--benchmark-json={out}", "-q", "-k", "test_allocate and s1024")
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    names = [b["name"] for b in data["benchmarks"]]
    assert names == ["test_allocate[s1024]"], names
    assert data["benchmarks"][0]["stats"]["rounds"] >= 1
