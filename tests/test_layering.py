"""The library's layering, read from the source with ``ast`` (nothing is imported).

* The core (everything under ``zipvl/`` but the application: the demo, the evaluation, the
  command line and the testing helpers) never imports the application.
* transformers is imported by one module, ``zipvl.cache.hf_compat``; everything else takes its
  names from there.
* Planning (allocate -> select) happens in one module, ``zipvl.sparsity.pipeline``: no other core
  module calls an allocator, a selector or a keep mask itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zipvl"

APPLICATION = (
    "zipvl.demo",
    "zipvl.demo_args",
    "zipvl.eval",
    "zipvl.eval_budget",
    "zipvl.cli",
    "zipvl.__main__",
    "zipvl.testing",
)
"""Modules (and packages) that use the library and that the library must not import."""

HF_COMPAT = "zipvl.cache.hf_compat"
"""The one module that imports transformers."""

PIPELINE = "zipvl.sparsity.pipeline"
"""The one module that runs allocate -> select (``plan_tokens``, ``plan_scores``,
``plan_row_keep``)."""

PLANNING_CALLS = frozenset(
    {"allocator", "selector", "keep_mask", "keep_and_indices", "decode_selector"}
)
"""Names whose call is a planning step (``self.allocator(...)``, ``selector(...)``, ...)."""

COMPONENT_MODULES = ("zipvl.sparsity.allocators", "zipvl.sparsity.selectors")
"""Components that call themselves or the components they wrap (``PerLayerSchedule``,
``TopKSelector.__call__`` -> ``keep_mask``)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _core_sources() -> list[Path]:
    return [p for p in _sources() if not _is_under(_module_name(p), APPLICATION)]


def _imports(path: Path, source: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (or in ``source`` standing at
    ``path``), ``from a import b`` giving both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    text = path.read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def test_the_scan_sees_the_core_and_the_application() -> None:
    core = {_module_name(p) for p in _core_sources()}
    assert {"zipvl.sparsity", "zipvl.quant", "zipvl.cache", "zipvl.decode"} <= core
    assert "zipvl.models.attention" in core
    assert not any(_is_under(m, APPLICATION) for m in core)
    every = {_module_name(p) for p in _sources()}
    assert {"zipvl.demo", "zipvl.eval", "zipvl.cli", "zipvl.testing.lvlm"} <= every


@pytest.mark.parametrize("path", _core_sources(), ids=lambda p: _module_name(p))
def test_the_core_does_not_import_the_application(path: Path) -> None:
    bad = [f"line {n}: {m}" for n, m in _imports(path) if _is_under(m, APPLICATION)]
    assert not bad, f"{_module_name(path)} imports application code: {bad}"


def test_the_scan_finds_an_application_import() -> None:
    src = "from zipvl import demo\nfrom ..testing.lvlm import tiny_inputs\nimport zipvl.eval\n"
    found = {m for _, m in _imports(PACKAGE / "sparsity" / "probe.py", src)}
    assert {"zipvl.demo", "zipvl.testing.lvlm", "zipvl.eval"} <= found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: _module_name(p))
def test_only_hf_compat_imports_transformers(path: Path) -> None:
    if _module_name(path) == HF_COMPAT:
        return
    bad = [f"line {n}: {m}" for n, m in _imports(path) if _is_under(m, ("transformers",))]
    assert not bad, f"{_module_name(path)} imports transformers (use {HF_COMPAT}): {bad}"


def test_hf_compat_imports_transformers() -> None:
    path = PACKAGE / "cache" / "hf_compat.py"
    assert _module_name(path) == HF_COMPAT
    assert any(m == "transformers" for _, m in _imports(path))
    found = {m for _, m in _imports(path, "def f():\n    from transformers import Cache\n")}
    assert "transformers.Cache" in found  # imports inside functions count too


def _planning_calls(path: Path, source: str | None = None) -> list[str]:
    """``line: name`` of every call of an allocator, selector or keep mask in ``path``."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in PLANNING_CALLS:
            found.append(f"line {node.lineno}: {name}")
    return found


@pytest.mark.parametrize("path", _core_sources(), ids=lambda p: _module_name(p))
def test_only_the_pipeline_allocates_and_selects(path: Path) -> None:
    if _module_name(path) in (PIPELINE, *COMPONENT_MODULES):
        return
    bad = _planning_calls(path)
    assert not bad, f"{_module_name(path)} plans by itself (use {PIPELINE}): {bad}"


def test_the_planning_scan_finds_direct_calls() -> None:
    src = (
        "budget = self.allocator(mass, layer_idx=0)\n"
        "keep = getattr(sel, 'keep_mask')\n"
        "keep = selector.keep_mask(mass, budget)\n"
        "sel = selector(scores, budget)\n"
    )
    found = _planning_calls(PACKAGE / "cache" / "layer.py", src)
    assert [f.split(": ")[1] for f in found] == ["allocator", "keep_mask", "selector"]
    assert _planning_calls(PACKAGE / "sparsity" / "pipeline.py")  # the pipeline itself does
