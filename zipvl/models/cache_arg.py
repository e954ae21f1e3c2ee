"""The keyword argument that carries a cache into transformers' ``generate`` and ``forward``.

transformers 5.24 renamed it from ``past_key_values=`` to ``cache=``: the old name still works
there but raises a ``FutureWarning`` (it leaves model ``forward`` at 5.40, ``generate`` at 6.0).
5.17 - 5.23 know only ``past_key_values=``. ``cache_kwargs(model, cache)`` returns the spelling
the installed version expects, so that one call site works on every supported version::

    out = model.generate(**inputs, **zipvl.cache_kwargs(model, cache), max_new_tokens=64)

How the name is found:

* a function that declares either name (every model ``forward``; ``inspect.signature`` sees
  through transformers' renaming decorator) is asked directly, so a model whose forward keeps
  the old name is still served correctly;
* ``generate`` declares neither (its cache arrives in ``**kwargs``), so its name comes from the
  installed version: ``cache`` from 5.24 on;
* for a model both ``forward`` and ``generate`` are resolved; if they disagree the call raises
  rather than guess (pass ``model.forward`` or ``model.generate`` instead).

This module imports nothing from transformers until it needs the installed version (which it
reads from ``zipvl.cache.hf_compat``).
"""

from __future__ import annotations

import inspect
from typing import Any

from packaging.version import Version

__all__ = ["CACHE", "CACHE_RENAMED_IN", "LEGACY", "cache_argument", "cache_kwargs"]

CACHE = "cache"
LEGACY = "past_key_values"
CACHE_RENAMED_IN = Version("5.24")
"""The first transformers release whose ``generate`` / ``forward`` take ``cache=``."""


def _transformers_version() -> str:
    # lazy: transformers is already imported wherever a model exists
    from zipvl.cache.hf_compat import TRANSFORMERS_VERSION

    return str(TRANSFORMERS_VERSION)


def _installed_argument() -> str:
    parsed = Version(_transformers_version())
    release = Version(".".join(str(p) for p in parsed.release))  # 5.24.0.dev0 counts as 5.24
    return CACHE if release >= CACHE_RENAMED_IN else LEGACY


def _declared_argument(fn: Any) -> str | None:
    """The cache argument ``fn`` declares by name, or None when it declares neither."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # not introspectable (a C callable, ...)
        return None
    if CACHE in params:
        return CACHE
    if LEGACY in params:
        return LEGACY
    return None


def cache_argument(target: object = None) -> str:
    """The name under which ``target`` takes a cache: ``"cache"`` or ``"past_key_values"``.

    Args:
        target: a transformers model (its ``forward`` and, if it has one, its ``generate`` are
            both resolved), a bound ``generate`` / ``forward`` (or any callable), or None for
            the installed transformers' default.

    Returns:
        ``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (5.17 - 5.23), or the name
        the callable declares.

    Raises:
        ValueError: ``target`` is a model whose ``forward`` and ``generate`` expect different
            names (pass the method you will call instead).
    """
    if target is None:
        return _installed_argument()
    forward = getattr(target, "forward", None)
    if forward is not None and not inspect.isroutine(target):
        # a model: the same keyword is used with model(...) and model.generate(...)
        names = {"forward": _declared_argument(forward) or _installed_argument()}
        generate = getattr(target, "generate", None)
        if callable(generate):
            names["generate"] = _declared_argument(generate) or _installed_argument()
        if len(set(names.values())) > 1:
            raise ValueError(
                f"{type(target).__name__}: forward takes the cache as {names['forward']}= but "
                f"generate as {names['generate']}=; pass model.forward or model.generate to "
                "cache_kwargs instead of the model"
            )
        return names["forward"]
    if not callable(target):
        raise TypeError(
            f"target: expected a model, a generate / forward method or None, got "
            f"{type(target).__name__}"
        )
    return _declared_argument(target) or _installed_argument()


def cache_kwargs(target: object, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the cache argument ``target`` expects, to unpack into the call.

    Example::

        cache = zipvl.enable(model, ZipVLConfig.preset("zipvl"))
        out = model.generate(**inputs, **zipvl.cache_kwargs(model, cache), max_new_tokens=64)
        logits = model(**inputs, **zipvl.cache_kwargs(model, cache)).logits

    Args:
        target: the model, or the bound ``generate`` / ``forward`` that will receive the cache
            (see ``cache_argument``).
        cache: the cache, e.g. the ``ZipVLCache`` returned by ``zipvl.enable``.

    Returns:
        ``{"cache": cache}`` on transformers >= 5.24, ``{"past_key_values": cache}`` on
        5.17 - 5.23 (or what ``target`` itself declares).
    """
    return {cache_argument(target): cache}
