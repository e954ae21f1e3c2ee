"""pytest configuration for ``bench/``.

* The benchmark suites are named ``bench_*.py``, which the repository's default ``python_files``
  (``test_*.py``) does not match: ``pytest bench/`` collects them here, so the documented
  regression command (``pytest bench/ --benchmark-only --benchmark-json=new.json``) runs every
  suite. A file given explicitly on the command line is collected by pytest itself, once.
* The repository's pytest ``addopts`` carry ``--benchmark-disable`` so that the test suite never
  times anything; asking for ``--benchmark-only`` on the command line means "run the benchmarks",
  so it turns timing back on instead of failing on the two contradicting options.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH_PREFIX = "bench_"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith(BENCH_PREFIX)
        and not parent.session.isinitpath(file_path)  # explicit paths: pytest collects them
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
