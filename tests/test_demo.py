"""``zipvl demo``: the built-in tiny LVLM and a saved local checkpoint, in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zipvl.cli import main
from zipvl.demo import amdahl_bound, run_demo
from zipvl.demo_args import LARGE_PROBE_CAP, _probe_cap
from zipvl.testing.demo_lvlm import (
    DEMO_SPECS,
    build_demo_lvlm,
    build_tiny_processor,
    demo_inputs,
    synthetic_image,
    synthetic_video,
)

TABLE_HEADER = "| layer | prompt | kept | ratio | attn FLOPs red. |"


def test_demo_runs_in_a_minute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path), "--max-new-tokens", "6", "--repeats", "1"]) == 0
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
    assert TABLE_HEADER in out
    spec = DEMO_SPECS["tiny"]
    assert f"prompt {spec.visual_tokens + 25} tokens ({spec.visual_tokens} visual)" in out
    for text in ("attention-FLOP reduction", "compression", "prefill time", "agreement"):
        assert text in out
    assert "Amdahl bound" in out and "probe queries: at most 64 recent + 64 random" in out
    assert "[zipvl demo]" in err  # progress goes to stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "kept_ratio.png").read_bytes()[:4] == b"\x89PNG"
    assert len(summary["zipvl_tokens"]) == len(summary["dense_tokens"]) == 6
    # planted structure: data-dependent sparsity well below tau's share, different per layer
    ratios = summary["layer_kept_ratio"]
    assert len(ratios) == spec.layers and max(ratios) < 0.9 and len(set(ratios)) > 1
    assert summary["attn_flop_reduction"] > 0.2 and summary["compression"] > 2.0
    assert 0.0 < summary["attn_share_dense"] <= 1.0 and summary["probe_cap"] == 64
    bound = amdahl_bound(summary["attn_share_dense"], ratios)
    assert summary["amdahl_bound"] == pytest.approx(bound) and bound > 1.0
    assert f"Amdahl bound {bound:.2f}x" in out


def test_amdahl_bound() -> None:
    assert amdahl_bound(0.0, [0.2]) == 1.0  # no attention: nothing to gain
    assert amdahl_bound(1.0, [0.5]) == pytest.approx(4.0)  # all attention: 1 / (p/n)^2
    assert amdahl_bound(0.5, [0.0, 1.0]) == pytest.approx(1 / (0.5 + 0.5 * 0.5))
    assert amdahl_bound(0.6, [1.0]) == 1.0  # dense layers gain nothing
    with pytest.raises(ValueError, match=r"attn_share: expected a value in \[0, 1\], got 1.5"):
        amdahl_bound(1.5, [0.5])
    with pytest.raises(ValueError, match=r"kept_ratios: expected at least one layer"):
        amdahl_bound(0.5, [])


def test_large_demo_defaults_to_a_probe_cap() -> None:
    assert _probe_cap(None, "large", None) == (LARGE_PROBE_CAP, True) and LARGE_PROBE_CAP == 64
    assert _probe_cap(32, "large", None) == (32, False)  # an explicit cap wins
    assert _probe_cap(None, "tiny", None) == (None, False)
    assert _probe_cap(None, "large", "/ckpt") == (None, False)  # checkpoints: as given
    # the large prompt is where attention dominates: 64k visual tokens, resizable by frames
    spec = DEMO_SPECS["large"]
    assert spec.visual_tokens == 65536 and spec.tokens_per_picture == 256


def test_frames_resize_the_prompt(tmp_path: Path) -> None:
    inputs = demo_inputs("tiny", frames=2)
    spec = DEMO_SPECS["tiny"]
    assert inputs["pixel_values"].shape == (3, 3, spec.image_size, spec.image_size)
    assert int((inputs["input_ids"] == 255).sum()) == 3 * spec.tokens_per_picture
    assert demo_inputs("tiny", frames=0)["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match=r"frames: expected an int >= 0 or None, got -1"):
        demo_inputs("tiny", frames=-1)
    res = run_demo(
        frames=1,
        out_dir=tmp_path,
        max_new_tokens=1,
        repeats=1,
        progress=False,
        stdout=open(tmp_path / "out.txt", "w"),  # noqa: SIM115
    )
    assert res.visual_tokens == 2 * spec.tokens_per_picture
    assert res.prompt_tokens == 1 + res.visual_tokens + 24
    assert "1 image + 1-frame video" in res.text


def test_demo_tau_changes_the_ratio(tmp_path: Path) -> None:
    kw = dict(out_dir=tmp_path, max_new_tokens=2, repeats=1, progress=False)
    loose = run_demo(tau=0.9, stdout=open(tmp_path / "a.txt", "w"), **kw)  # noqa: SIM115
    tight = run_demo(tau=0.99, stdout=open(tmp_path / "b.txt", "w"), **kw)  # noqa: SIM115
    assert loose.report.kept_ratio < tight.report.kept_ratio
    assert "tau=0.9," in loose.text and TABLE_HEADER in tight.text


def test_demo_on_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build_demo_lvlm("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    build_tiny_processor("tiny").save_pretrained(tmp_path / "ckpt")
    argv = ["demo", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--max-new-tokens", "3", "--repeats", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {tmp_path / 'ckpt'} (LlavaForConditionalGeneration" in out
    assert "(64 visual)" in out and TABLE_HEADER in out and "[zipvl demo]" not in err


def test_synthetic_inputs_are_deterministic() -> None:
    assert torch.equal(synthetic_image(56, seed=1), synthetic_image(56, seed=1))
    assert not torch.equal(synthetic_image(56, seed=1), synthetic_image(56, seed=2))
    video = synthetic_video(3, 28)
    assert video.shape == (3, 3, 28, 28) and not torch.equal(video[0], video[-1])  # it moves
    inputs = demo_inputs("tiny")
    spec = DEMO_SPECS["tiny"]
    assert inputs["pixel_values"].shape == (1 + spec.frames, 3, spec.image_size, spec.image_size)
    assert int((inputs["input_ids"] == 255).sum()) == spec.visual_tokens


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_demo_over_two_processes_keeps_what_one_process_keeps(tmp_path: Path) -> None:
    """``zipvl demo --tp 2`` starts torchrun itself: the built-in model's heads are sharded
    over 2 CPU processes (gloo), and every layer keeps what the one-process demo keeps."""
    args = ["--frames", "1", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2"]
    argv = ["-m", "zipvl", "demo", "--tp", "2", "--quiet", "--out", str(tmp_path), *args]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(TABLE_HEADER) == 1  # rank 0 prints, rank 1 does not
    assert "tensor parallel: 2 processes (cpu)" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    one = run_demo(
        frames=1,
        repeats=1,
        warmup=0,
        max_new_tokens=2,
        out_dir=tmp_path / "one",
        progress=False,
        stdout=open(os.devnull, "w"),  # noqa: SIM115
    )
    assert summary["tp"] == 2
    kept = [r.kept_tokens for r in one.report.layers]
    assert summary["rank_kept_tokens"] == [kept, kept]
    assert summary["layer_kept_ratio"] == [r.kept_ratio for r in one.report.layers]
