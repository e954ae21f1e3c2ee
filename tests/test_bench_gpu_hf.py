"""bench/gpu_hf.py runs end to end on the CPU with the tiny model (every variant, sane ratios)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_hf.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_hf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_hf = _load()
    out = tmp_path / "gpu_hf.json"
    args = ["--device", "cpu", "--tiny", "--lengths", "64", "--batch", "1"]
    args += ["--decode-points", "0", "8", "--window", "3", "--out", str(out)]
    payload = gpu_hf.main(args)
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(out.read_text())  # the JSON line comes last
    table = [line for line in printed if line.startswith("| ")]
    assert table[0].startswith("| variant | SDPA backend | length | batch | prefill ms |")
    body = table[1:]
    assert sorted(line.split(" | ")[0].removeprefix("| ") for line in body) == sorted(
        gpu_hf.VARIANTS
    )
    assert all("cpu default (not forced)" in line for line in body)
    rows = payload["rows"]
    assert {r["variant"] for r in rows} == set(gpu_hf.VARIANTS)
    for r in rows:
        assert r["status"] == "ok"
        assert r["S"] == 64 and r["B"] == 1
        ratios = [r["prefill_x"], *r["decode_x"].values()]
        assert len(ratios) == 3
        assert all(isinstance(x, float) and x > 0 and math.isfinite(x) for x in ratios)
        assert [d["start"] for d in r["decode"].values()] == [0, 8]
    # the fastest dense variant has speed-up 1 at each point
    dense = [r for r in rows if r["dense"] and r["variant"] != "dense-noattn"]
    assert max(r["prefill_x"] for r in dense) == pytest.approx(1.0)
    fixed = next(r for r in rows if r["variant"] == "fixed")
    assert fixed["kept_ratio"] == pytest.approx(0.42, abs=0.02)
    # the Amdahl bound: the attention share from dense-noattn against the fastest dense prefill
    null = next(r for r in rows if r["variant"] == "dense-noattn")
    f = 1 - null["prefill_ms"] / min(r["prefill_ms"] for r in dense)
    assert fixed["attn_share"] == pytest.approx(max(f, 0.0))
    bound = 1 / ((1 - fixed["attn_share"]) + fixed["attn_share"] * fixed["kept_ratio"] ** 2)
    assert fixed["amdahl_bound"] == pytest.approx(bound)
    assert fixed["frac_of_bound"] == pytest.approx(fixed["prefill_x"] / bound)
    assert all(r["amdahl_bound"] is None for r in dense)
    assert set(payload["compiles_after_warmup"]) == set(gpu_hf.VARIANTS)


def test_replicate_prefills_one_row_and_decodes_the_batch(tmp_path: Path) -> None:
    """--replicate: one row is prefilled, its cache repeated to the batch (dense and ZipVL); the
    repeated caches hold as many bytes as a batch prefilled in one forward."""
    gpu_hf = _load()
    args = ["--device", "cpu", "--tiny", "--lengths", "300", "--batch", "3"]
    args += ["--decode-points", "0", "4", "--window", "2", "--variants", "dense-flash", "fixed"]
    rep = gpu_hf.main([*args, "--replicate", "--out", str(tmp_path / "r.json")])["rows"]
    one = gpu_hf.main([*args, "--out", str(tmp_path / "o.json")])["rows"]
    for r, o in zip(rep, one, strict=True):
        assert r["status"] == "ok" and r["B"] == 3 and r["generated"] == 6
        assert (r["prefill_rows"], o["prefill_rows"]) == (1, 3)
        assert r["kv_gib"] == pytest.approx(o["kv_gib"])
    # 300 tokens fill pages: the ZipVL rows hold their own copies, as if prefilled together
    fixed = next(r for r in rep if r["variant"] == "fixed")
    assert fixed["kept_ratio"] == pytest.approx(0.42, abs=0.02)


def test_prefill_reps_report_the_first_call_apart(tmp_path: Path) -> None:
    gpu_hf = _load()
    args = ["--device", "cpu", "--tiny", "--lengths", "64", "--batch", "1", "--decode-points",
            "0", "--window", "2", "--variants", "fixed", "--prefill-reps", "3",
            "--out", str(tmp_path / "hf.json")]  # fmt: skip
    calls: list[int] = []
    original = gpu_hf.Session.forward

    def counted(self, ids, cache):
        calls.append(ids.shape[-1])
        return original(self, ids, cache)

    gpu_hf.Session.forward = counted
    try:
        (row,) = gpu_hf.main(args)["rows"]
    finally:
        gpu_hf.Session.forward = original
    assert calls.count(64) == 3  # three prefills at the case's length, one cache each
    assert row["prefill_first_ms"] > 0 and row["prefill_ms"] > 0
