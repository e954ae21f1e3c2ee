"""The one place where zipvl's cache touches transformers internals (style rule A3).

transformers restructured ``cache_utils`` twice in 2025 (per-layer ``CacheLayerMixin`` objects,
then the ``crop(-n)`` convention and ``get_max_cache_shape`` -> ``get_max_length``). This module
checks the installed version against the range zipvl is tested with and re-exports the names the
cache needs, so that ``zipvl.cache.layer`` / ``zipvl.cache.cache`` never import transformers
themselves and a future break is fixed here only.

Tested range: transformers >= 5.17, < 6 (CI: the newest 5.x, and 5.17 for the transformers tests).
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

__all__ = [
    "MAX_VERSION",
    "MIN_VERSION",
    "TRANSFORMERS_VERSION",
    "AttentionInterface",
    "AttentionMaskInterface",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "check_transformers_version",
]

MIN_VERSION = Version("5.17")
MAX_VERSION = Version("6")  # exclusive


def check_transformers_version(version: str) -> Version:
    """Parse ``version`` and check it lies in ``[MIN_VERSION, MAX_VERSION)``.

    Args:
        version: a transformers version string, e.g. ``"5.23.0"`` or ``"5.18.0.dev0"``.

    Returns:
        The parsed version.

    Raises:
        ImportError: the version is outside the supported range (the Cache API differs there).
    """
    parsed = Version(version)
    # compare the release tuple so that 5.17.0.dev0 (a pre-release of a supported API) passes
    release = Version(".".join(str(p) for p in parsed.release))
    if not (MIN_VERSION <= release < MAX_VERSION):
        raise ImportError(
            f"zipvl.cache: transformers version must be >= {MIN_VERSION} and < {MAX_VERSION} "
            f"(the per-layer Cache API zipvl is written against), got {version}"
        )
    return parsed


TRANSFORMERS_VERSION: Version = check_transformers_version(transformers.__version__)
