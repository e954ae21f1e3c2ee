"""bench/gpu_hf_graph.py runs end to end on the CPU with the tiny model (the recorded step by the
stand-in recorder): every ZipVL variant gives a row, the replayed ZipVL decode generates the
eager ZipVL tokens, and the decoder's counters add up."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_hf_graph.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_gpu_hf_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("OUT", raising=False)
    bench = _load()
    args = ["--device", "cpu", "--tiny", "--lengths", "64", "--batch", "1", "--steps", "6"]
    args += ["--points", "0", "110", "--variants", "dense-flash", "fixed", "fixed-graph"]
    payload = bench.main(args)
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == payload
    rows = {r["variant"]: r for r in payload["rows"]}
    assert all(r["status"] == "ok" for r in rows.values())
    assert set(rows["fixed-graph"]["ms_at"]) == {"0", "110"}
    assert rows["fixed-graph"]["agree_tokens"] == 1.0  # the same greedy tokens as eager
    assert rows["fixed-graph"]["agree_steps"] == 8 + 110 + 6  # over every step, blocks included
    st = rows["fixed-graph"]["stats"]
    assert st["replays"] + st["eager"] == 8 + 110 + 6  # warm-up, up to @110, its window
    assert st["recompressions"] == 2  # one block of 100 per layer (2 layers)
    table = [line for line in printed if line.startswith("| ")]
    assert table[0].startswith("| variant | SDPA backend | length | batch | ms/token @0 / @110 |")
