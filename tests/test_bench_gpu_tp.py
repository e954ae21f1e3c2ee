"""bench/gpu_tp.py parses its arguments and runs a tiny smoke case on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_tp.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("OUT", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_help_parses_without_a_gpu() -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "--lengths" in res.stdout and "--no-single" in res.stdout


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_tiny_run_on_two_cpu_processes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(SCRIPT), "--tiny", "--device", "cpu", "--lengths", "64", "--steps", "2"]
    cmd += ["--warmup-length", "32", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]
    res = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    payload = json.loads(res.stdout.strip().splitlines()[-1])  # the JSON line comes last
    assert payload == json.loads(out.read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"tp-zipvl", "tp-dense", "1gpu-zipvl", "1gpu-dense"}
    assert all(r["status"] == "ok" and r["prefill_ms"] > 0 for r in rows.values())
    # the sharded model keeps what the whole model keeps (the mass is all-reduced)
    assert rows["tp-zipvl"]["kept_ratio"] == rows["1gpu-zipvl"]["kept_ratio"]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_one_rank_runs_the_single_process_baseline_and_refuses_tp_variants(
    tmp_path: Path,
) -> None:
    """The one-GPU baseline (1gpu-zipvl vs 1gpu-dense) runs on one rank; asking one rank for a
    tensor-parallel variant stops with a message instead of measuring nothing."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += [str(SCRIPT), "--tiny", "--device", "cpu", "--lengths", "64", "--steps", "2"]
    cmd += ["--ckpt", str(tmp_path / "ckpt")]
    out = tmp_path / "one.json"

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *extra], env=_env(), capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip

    res = run("--variants", "1gpu-zipvl", "1gpu-dense", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["world_size"] == 1
    assert [(r["variant"], r["status"]) for r in payload["rows"]] == [
        ("1gpu-zipvl", "ok"),
        ("1gpu-dense", "ok"),
    ]
    assert payload["rows"][0]["kept_ratio"] is not None
    res = run("--variants", "tp-zipvl")
    assert res.returncode != 0 and "need >= 2 ranks" in res.stdout + res.stderr
