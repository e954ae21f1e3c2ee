"""``cache_kwargs``: the cache reaches ``generate`` / ``forward`` under the name the installed
transformers takes (``cache=`` from 5.24, ``past_key_values=`` on 5.17 - 5.23), with no
``FutureWarning``; the name-resolution rules on stand-in callables for either version."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version

import zipvl
from zipvl.cache.hf_compat import DynamicCache
from zipvl.models import cache_arg, cache_argument, cache_kwargs, disable, enable, new_cache
from zipvl.testing.lvlm import build_tiny_model, tiny_inputs

INSTALLED = Version(transformers.__version__).release
RENAMED = INSTALLED >= (5, 24)
EXPECTED = "cache" if RENAMED else "past_key_values"


# -- resolution rules (stand-ins, any installed version) ---------------------------------------


def _pretend(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(cache_arg, "_transformers_version", lambda: version)


def _old_forward(input_ids: Any = None, past_key_values: Any = None, **kwargs: Any) -> Any:
    return past_key_values


def _new_forward(input_ids: Any = None, cache: Any = None, **kwargs: Any) -> Any:
    return cache


def _renamed(fn: Any) -> Any:
    """A stand-in for transformers' ``deprecate_kwarg``: maps the old name, keeps the signature."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return fn(*args, **kwargs)

    return wrapped


def _generate(*args: Any, **kwargs: Any) -> Any:  # like GenerationMixin.generate: **kwargs only
    return kwargs


@pytest.mark.parametrize("version", ["5.17.0", "5.23.0", "5.24.0", "5.30.1"])
def test_a_declared_name_wins_over_the_version(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    _pretend(monkeypatch, version)
    sentinel = object()
    assert cache_kwargs(_old_forward, sentinel) == {"past_key_values": sentinel}
    assert cache_kwargs(_new_forward, sentinel) == {"cache": sentinel}
    assert _new_forward(**cache_kwargs(_new_forward, sentinel)) is sentinel
    # the renaming decorator keeps the new signature visible
    assert cache_argument(_renamed(_new_forward)) == "cache"


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("5.17.0", "past_key_values"),
        ("5.23.0", "past_key_values"),
        ("5.23.9.dev0", "past_key_values"),
        ("5.24.0.dev0", "cache"),
        ("5.24.0", "cache"),
        ("5.39.2", "cache"),
    ],
)
def test_kwargs_only_callables_follow_the_version(
    monkeypatch: pytest.MonkeyPatch, version: str, name: str
) -> None:
    _pretend(monkeypatch, version)
    assert cache_argument(_generate) == name
    assert cache_argument() == name
    sentinel = object()
    assert _generate(**cache_kwargs(_generate, sentinel)) == {name: sentinel}


class _Model:
    """forward and generate like a transformers model (``model(...)`` calls ``forward``)."""

    def __init__(self, forward: Any) -> None:
        self.forward = forward

    def generate(self, **kwargs: Any) -> Any:
        return kwargs


def test_a_model_resolves_forward_and_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, "5.17.0")
    assert cache_argument(_Model(_old_forward)) == "past_key_values"
    with pytest.raises(ValueError, match=r"forward takes the cache as cache= but generate as "):
        cache_argument(_Model(_new_forward))
    assert cache_argument(_Model(_new_forward).forward) == "cache"  # a method is unambiguous
    _pretend(monkeypatch, "5.24.0")
    assert cache_argument(_Model(_new_forward)) == "cache"
    with pytest.raises(ValueError, match=r"as past_key_values= but generate as cache="):
        cache_kwargs(_Model(_old_forward), None)
    assert cache_argument(_Model(_old_forward).generate) == "cache"


def test_not_a_callable_raises() -> None:
    with pytest.raises(TypeError, match=r"target: expected a model"):
        cache_argument(42)


def test_public_name() -> None:
    assert zipvl.cache_kwargs is cache_kwargs
    assert "cache_kwargs" in zipvl.__all__


# -- the installed transformers ---------------------------------------------------------------


def test_real_models_take_the_installed_name() -> None:
    model = build_tiny_model("llava")
    assert cache_argument(model) == EXPECTED
    assert cache_argument(model.forward) == EXPECTED
    assert cache_argument(model.generate) == EXPECTED
    assert cache_argument(model.get_decoder()) == EXPECTED  # a bare decoder has no generate


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_the_cache_is_used_and_nothing_warns(arch: str) -> None:
    model = build_tiny_model(arch)
    inputs = tiny_inputs(model, batch=1, text_len=10)
    prompt = int(inputs["input_ids"].shape[1])
    new_tokens = 5
    cache = enable(model)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, **cache_kwargs(model, cache)
            )
            fresh = new_cache(model)
            model(**inputs, **cache_kwargs(model, fresh))
    finally:
        disable(model)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    # the cache really carried the generation (the last token is never fed back)
    assert cache.get_seq_length() == prompt + new_tokens - 1
    assert fresh.get_seq_length() == prompt


def test_the_other_spelling_is_what_the_helper_avoids() -> None:
    """On 5.24+ the old name warns (and the suite's filter makes that an error); on 5.17 - 5.23
    the new name is swallowed by ``**kwargs`` and the cache silently stays empty."""
    model = build_tiny_model("llama")
    inputs = tiny_inputs(model, batch=1, text_len=10)
    dense = DynamicCache()
    with torch.no_grad():
        if RENAMED:
            with pytest.raises(FutureWarning, match=r"past_key_values"):
                model(**inputs, past_key_values=dense)
        else:
            model(**inputs, cache=dense)
            assert dense.get_seq_length() == 0


def test_the_suite_turns_past_key_values_future_warnings_into_errors() -> None:
    with pytest.raises(FutureWarning):
        warnings.warn("`past_key_values` is deprecated; use `cache`", FutureWarning, stacklevel=1)
    with pytest.warns(FutureWarning):  # other FutureWarnings keep their default handling
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
