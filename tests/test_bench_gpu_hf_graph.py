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


def test_batch_of_runs_each_variant_at_its_own_batches(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batch-of (the capacity comparison): a variant runs at its own batches only, and each row
    reports tokens/s = batch / time per step."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("OUT", raising=False)
    bench = _load()
    args = ["--device", "cpu", "--tiny", "--lengths", "64", "--batch", "1", "--steps", "2"]
    args += ["--warmup", "1", "--variants", "dense-flash", "fixed-graph"]
    args += ["--batch-of", "fixed-graph=3"]
    payload = bench.main(args)
    capsys.readouterr()
    got = sorted((r["variant"], r["B"]) for r in payload["rows"])
    assert got == [("dense-flash", 1), ("fixed-graph", 3)]
    for r in payload["rows"]:
        assert r["status"] == "ok"
        assert r["tokens_per_s"] == pytest.approx(r["B"] * 1e3 / r["ms_per_token"])


@pytest.mark.parametrize("spec", ["fixed=2", "fixed-graph", "fixed-graph=0", "fixed-graph=a"])
def test_batch_of_rejects_bad_specs(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--variants", "fixed-graph", "--batch-of", spec])
    assert "--batch-of" in capsys.readouterr().err
