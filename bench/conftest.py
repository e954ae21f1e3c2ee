"""pytest configuration for ``bench/``.

The repository's pytest ``addopts`` carry ``--benchmark-disable`` so that the test suite never
times anything; asking for ``--benchmark-only`` on the command line means "run the benchmarks",
so it turns timing back on instead of failing on the two contradicting options.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
