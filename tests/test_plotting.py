"""matplotlib is optional (the ``plot`` extra): without it the plots raise an ImportError that
names the extra, and nothing else needs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zipvl import plotting
from zipvl.demo import plot_kept_ratio

from .test_demo_args import _report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib (and any of its loaded submodules) cannot be imported."""
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_available_with_matplotlib() -> None:
    assert plotting.available()


@pytest.mark.usefixtures("no_matplotlib")
def test_report_plot_names_the_extra(tmp_path: Path) -> None:
    assert not plotting.available()
    with pytest.raises(ImportError, match=r"CacheReport\.plot needs matplotlib.*zipvl\[plot\]"):
        _report([0.5, 0.7]).plot(tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


@pytest.mark.usefixtures("no_matplotlib")
def test_demo_plot_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"kept-ratio plot needs matplotlib.*zipvl\[plot\]"):
        plot_kept_ratio(_report([0.5]), tmp_path / "p.png", preset="zipvl")


def test_matplotlib_is_an_extra_that_the_tests_install() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras[plotting.EXTRA])
    assert "zipvl[plot]" in extras["test"] and "zipvl[test]" in extras["dev"]
