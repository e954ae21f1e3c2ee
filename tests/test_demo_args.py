"""``zipvl demo``: every argument is checked before anything is built; timing spread, progress
bars and the plot."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from zipvl import cli
from zipvl.cache.report import CacheReport, LayerReport
from zipvl.cli import PRESET_NAMES, main, out_dir_problem
from zipvl.config import PRESETS
from zipvl.demo import (
    DEMO_SIZES,
    SPREAD_LIMIT,
    Timing,
    _bar,
    _Progress,
    check_demo_args,
    kept_ratio_figure,
    plot_kept_ratio,
    speedup_note,
)
from zipvl.demo_args import LARGE_CPU_WARNING
from zipvl.testing import demo_lvlm as lvlm


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI on ``argv``, expect argparse's usage error, return its one error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("zipvl demo: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model or loading one fails the test: arguments must be rejected first."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(lvlm, "build_demo_lvlm", fail)
    monkeypatch.setattr(lvlm, "load_local_model", fail)
    monkeypatch.setattr(lvlm, "load_demo_lvlm_tp", fail)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
        (["--device", "cuda:x"], "argument --device: expected cpu, cuda or cuda:N"),
        (["--preset", "kivi", "--tau", "0.9"], "argument --tau: preset 'kivi' has no tau"),
        (["--preset", "fixed", "--tau", "0.9"], "argument --tau: preset 'fixed' has no tau"),
        (["--preset", "kivi", "--probe-cap", "8"], "argument --probe-cap: preset 'kivi'"),
        (["--tau", "0"], "argument --tau: expected a number in (0, 1], got 0.0"),
        (["--tau", "nan"], "argument --tau: expected a number in (0, 1], got nan"),
        (["--probe-cap", "0"], "argument --probe-cap: expected an int >= 1, got 0"),
        (["--repeats", "0"], "argument --repeats: expected an int >= 1, got 0"),
        (["--warmup", "-1"], "argument --warmup: expected an int >= 0, got -1"),
        (["--max-new-tokens", "x"], "argument --max-new-tokens: expected an int >= 1, got 'x'"),
        (["--frames", "-2"], "argument --frames: expected an int >= 0, got -2"),
        (["--recompress-every", "0"], "argument --recompress-every: expected an int >= 1"),
        (["--seed", "-1"], "argument --seed: expected an int >= 0, got -1"),
        (["--preset", "h2o"], "argument --preset: invalid choice: 'h2o'"),
        (["--tp", "0"], "argument --tp: expected an int >= 1, got 0"),
    ],
)
def test_bad_arguments_are_usage_errors(
    extra: list[str],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    nothing_built: None,
) -> None:
    line = _usage_error(["demo", "--out", str(tmp_path / "out"), *extra], capsys)
    assert expected in line


def test_bad_out_and_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None
) -> None:
    missing = tmp_path / "missing" / "out"
    line = _usage_error(["demo", "--out", str(missing)], capsys)
    assert f"argument --out: the parent directory '{missing.parent}'" in line
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "argument --out: " in _usage_error(["demo", "--out", str(a_file)], capsys)
    assert "is not a directory" in _usage_error(["demo", "--out", str(a_file / "o")], capsys)
    argv = ["demo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]
    line = _usage_error(argv, capsys)
    assert "argument --model: expected a local checkpoint directory" in line
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    line = _usage_error(["demo", "--model", str(ckpt), "--frames", "3"], capsys)
    assert "argument --frames: only for the built-in model" in line
    assert out_dir_problem(tmp_path / "new") is None and out_dir_problem(tmp_path) is None


def test_tp_inside_torchrun_must_match_its_world_size(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nothing_built: None,
) -> None:
    """Under torchrun (WORLD_SIZE set) ``--tp`` runs the demo in this process, so the two must
    agree; a GPU index cannot be chosen (each process takes its LOCAL_RANK's)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = _usage_error(["demo", "--tp", "2", "--out", str(tmp_path)], capsys)
    assert "argument --tp: expected to run in one of 2 torchrun processes (WORLD_SIZE=2)" in line
    assert "got WORLD_SIZE=3" in line
    with pytest.raises(ValueError, match=r"^tp: expected to run in one of 2 torchrun"):
        check_demo_args(tp=2, out_dir=tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^device: expected 'cpu' or 'cuda' with tp=2"):
        check_demo_args(tp=2, device="cuda:0", out_dir=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        line = _usage_error(["demo", "--out", str(locked / "out")], capsys)
        assert "argument --out: cannot create" in line and "is not writable" in line
    finally:
        locked.chmod(0o700)


def test_triton_on_a_cpu(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    nothing_built: None,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["demo", "--quant-impl", "triton", "--out", str(tmp_path)]
    line = _usage_error(argv, capsys)
    assert "argument --quant-impl: 'triton' runs the fused Triton kernel" in line
    assert "got --device cpu" in line
    with pytest.raises(ValueError, match=r"^quant_impl: 'triton' .* needs a CUDA device"):
        check_demo_args(quant_impl="triton", out_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None
) -> None:
    line = _usage_error(["demo", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert "argument --device: 'cuda' requested but CUDA is not available" in line


def test_library_checks_name_the_parameter(tmp_path: Path) -> None:
    cases = [
        (dict(device="gpu"), r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        (dict(preset="kivi", tau=0.9), r"^tau: preset 'kivi' has no tau to set"),
        (dict(size="huge"), r"^size: expected one of \['tiny', 'large'\], got 'huge'"),
        (dict(warmup=-1), r"^warmup: expected an int >= 0"),
        (dict(out_dir=tmp_path / "a" / "b"), r"^out_dir: the parent directory"),
        (dict(quant_impl="cuda"), r"^quant_impl: expected one of 'reference', 'triton', got 'cu"),
    ]
    for kwargs, pattern in cases:
        kwargs.setdefault("out_dir", tmp_path)
        with pytest.raises(ValueError, match=pattern):
            check_demo_args(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tau_is_applied_or_refused(preset: str, tmp_path: Path) -> None:
    """A given tau is never ignored: either the preset's allocator uses it, or it is an error."""
    try:
        setup = check_demo_args(preset=preset, tau=0.9, out_dir=tmp_path)
    except ValueError as err:
        assert str(err).startswith(f"tau: preset {preset!r} has no tau to set")
        return
    cfg = setup.config
    assert cfg.tau == 0.9 and cfg.allocator is None
    assert cfg.for_layer(0).allocator.tau == 0.9  # type: ignore[attr-defined]
    assert cfg.sparse_prefill or "Mixed" in type(cfg.for_layer(0).quantizer).__name__


def test_cli_vocabularies_match_the_library() -> None:
    assert set(PRESET_NAMES) == set(PRESETS)
    assert set(DEMO_SIZES) == set(lvlm.DEMO_SPECS)


def test_large_on_a_cpu_warns_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_built: None
) -> None:
    with pytest.raises(AssertionError, match="the model was built"):
        main(["demo", "--size", "large", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert LARGE_CPU_WARNING in err  # even with --quiet
    setup = check_demo_args(size="large", out_dir=tmp_path)
    assert setup.warnings == (LARGE_CPU_WARNING,)
    assert check_demo_args(out_dir=tmp_path).warnings == ()


def test_speedup_note_says_when_it_means_nothing() -> None:
    steady_dense, steady_fast = Timing((10.0, 10.2, 10.1)), Timing((5.0, 5.1, 5.05))
    note = speedup_note(steady_dense, steady_fast)
    assert note.startswith("2.00x (range 1.96x to 2.04x)") and ":" not in note
    overlap = speedup_note(Timing((10.0, 11.0, 10.5)), Timing((10.2, 10.8, 10.4)))
    assert overlap.endswith("no measurable difference")
    noisy = speedup_note(Timing((10.0, 40.0, 12.0)), Timing((5.0, 5.1, 30.0)))
    assert "too widely for this speed-up to mean anything" in noisy
    low, high = 10.0 / 30.0, 40.0 / 5.0
    assert high / low > SPREAD_LIMIT and f"range {low:.2f}x to {high:.2f}x" in noisy
    t = Timing((3.0, 1.0, 2.0))
    assert (t.min, t.median, t.max) == (1.0, 2.0, 3.0)
    assert t.describe() == "2.0 ms (1.0 to 3.0)"
    with pytest.raises(ValueError, match="runs_ms: expected at least one timed run"):
        Timing(())


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_only() -> None:
    tty, log = _Terminal(), io.StringIO()
    for stream in (tty, log):
        prog = _Progress(True, stream)
        assert list(_bar(range(3), "prefill", 3, prog)) == [0, 1, 2]
        prog.start("generation", 4)
        for _ in range(5):  # the first call carries the prompt
            prog.put(torch.zeros(1))
        prog.end()
        prog.stage("done")
    out = tty.getvalue()
    assert "[zipvl demo] prefill" in out and "run/s" in out  # tqdm: rate and time left
    assert "[zipvl demo] generation" in out and "tok/s" in out
    assert log.getvalue() == "[zipvl demo] done\n"  # not a terminal: stage lines only
    quiet = _Terminal()
    prog = _Progress(False, quiet)
    list(_bar(range(2), "x", 2, prog))
    prog.stage("hidden")
    assert quiet.getvalue() == ""


def _report(ratios: list[float]) -> CacheReport:
    return CacheReport(
        tuple(
            LayerReport(
                layer=i,
                prompt_tokens=100,
                kept_tokens=round(100 * r),
                kept_ratio=r,
                attn_flop_reduction=1.0 - r * r,
                seq_length=100,
                tokens_at_bits={16: 100.0},
                decode_blocks=0,
                decode_block_tokens=0,
                decode_kept_tokens=0,
                bytes=100,
                bf16_bytes=100,
            )
            for i, r in enumerate(ratios)
        )
    )


@pytest.mark.parametrize("ratios", [[1.0] * 6, [0.2, 0.9, 1.0, 0.05], [0.5]])
def test_plot_legend_title_and_preset(ratios: list[float], tmp_path: Path) -> None:
    fig = kept_ratio_figure(_report(ratios), preset="dense")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert legend is not None
    box = legend.get_window_extent(renderer)
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert len(bars) == len(ratios)
    for bar in bars:
        assert not box.overlaps(bar.get_window_extent(renderer)), "the legend covers a bar"
    title = ax.get_title()
    assert "preset 'dense'" in title and "-0.0" not in title
    assert f"{1.0 - sum(r * r for r in ratios) / len(ratios):.1%} fewer" in title
    path = plot_kept_ratio(_report(ratios), tmp_path / "p.png", preset="zipvl")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_cli_module_is_light() -> None:
    assert cli.DEVICE_PATTERN.fullmatch("cuda:3") and not cli.DEVICE_PATTERN.fullmatch("gpu")
