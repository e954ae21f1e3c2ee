"""zipvl: adaptive token-sparse prefill and mixed-precision KV caches for vision-language models.

Implements ZipVL (He et al., arXiv 2410.08584 v1) as composable PyTorch components.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
