"""Startup cost: ``import zipvl`` and the command line load only what they use (subprocesses,
so that this test session's own imports do not hide anything)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(code: str) -> str:
    res = _python(code)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.parametrize(
    "module", ["zipvl", "zipvl.sparsity", "zipvl.quant", "zipvl.config", "zipvl.types"]
)
def test_import_without_transformers(module: str) -> None:
    _ok(
        f"""
        import sys
        import {module}
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
        assert not loaded, loaded
        """
    )


def test_bare_import_is_cheap() -> None:
    out = _ok(
        """
        import sys, time
        import torch
        t0 = time.perf_counter()
        import zipvl
        print(time.perf_counter() - t0)
        heavy = [m for m in ("zipvl.models", "zipvl.cache", "zipvl.sparsity", "zipvl.quant")
                 if m in sys.modules]
        assert not heavy, heavy
        """
    )
    assert float(out) < 2.0  # above torch's own import


def test_names_and_submodules_after_a_bare_import() -> None:
    _ok(
        """
        import sys
        import zipvl
        assert "transformers.masking_utils" not in sys.modules
        assert callable(zipvl.eval.evaluate)
        assert callable(zipvl.sparsity.plan_tokens) and callable(zipvl.quant.quantize)
        assert zipvl.ZipVLConfig is zipvl.config.ZipVLConfig
        assert zipvl.enable is zipvl.models.hf.enable  # loads the transformers integration
        assert "transformers.masking_utils" in sys.modules
        for name in zipvl.__all__:
            assert getattr(zipvl, name) is not None, name
        assert set(zipvl.__all__) <= set(dir(zipvl))
        from zipvl import decode_attention  # noqa: F401
        try:
            zipvl.no_such_name
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError("zipvl.no_such_name resolved")
        """
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["demo", "--preset", "h2o"],
        ["demo", "--device", "gpu"],
        ["demo", "--out", "/nonexistent/dir/out"],
        ["demo", "--quant-impl", "triton"],
        ["demo", "--repeats", "0"],
    ],
)
def test_help_and_argument_errors_stay_light(argv: list[str]) -> None:
    """``zipvl --help`` and argument errors import neither torch nor transformers (each of
    those costs seconds), and answer in well under a second."""
    out = _ok(
        f"""
        import sys, time, contextlib, io
        t0 = time.perf_counter()
        from zipvl.cli import main
        code = None
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main({argv!r})
            except SystemExit as exit:
                code = exit.code
        elapsed = time.perf_counter() - t0
        loaded = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not loaded, loaded
        print(code, elapsed)
        """
    )
    code, elapsed = out.split()
    assert code == ("0" if argv[-1] == "--help" else "2")
    assert float(elapsed) < 1.0


def test_console_entry_point_help() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "zipvl", "demo", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "--preset" in res.stdout
    assert "docs/decisions.md#probe-cap" in res.stdout.replace("\n", " ").replace(" ", "")
