"""bench/profile_decode_window.py runs end to end on the CPU with the tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "profile_decode_window.py"


def test_tiny_cpu_run_profiles_every_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_profile_decode_window", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    payload = module.main(["--device", "cpu", "--tiny", "--length", "300", "--batch", "2",
                           "--points", "3", "0", "--window", "2"])  # fmt: skip
    assert [p["point"] for p in payload["points"]] == [0, 3]
    for p in payload["points"]:
        assert p["wall_ms_per_step"] > 0
        assert p["kernels_per_step"] == 0 and p["top_kernels"] == []  # no CUDA on the CPU
        ops = p["top_host_ops"]
        assert any(r["name"] in ("aten::mm", "aten::addmm", "aten::linear") for r in ops)
        times = [r["ms_per_step"] for r in ops]
        assert times == sorted(times, reverse=True) and times[0] > 0  # costliest first
