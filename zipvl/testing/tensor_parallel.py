"""Tensor-parallel checks on the CPU: a tiny Qwen2 sharded with ``tp_plan="auto"`` over gloo.

``save_uneven_heads_model`` writes a tiny random Qwen2 whose KV heads differ in peakedness
(the key projection of KV head 0 is scaled up x100, that of the last head is left as it is), so
that a rank that budgets only its own heads keeps a different number of tokens than the whole
model would: the set-up that shows whether the mass is reduced across the tensor-parallel group.

Run under ``torchrun`` (every rank writes ``<out>/rank<r>.json``)::

    torchrun --nproc-per-node 2 -m zipvl.testing.tensor_parallel CHECKPOINT OUT [--no-reduce]

Each rank loads the checkpoint twice, sharded (``tp_plan="auto"``) and whole, and runs the
``dense`` and ``zipvl`` presets on both: generated tokens, the kept tokens per layer of its own
cache (``report(gather=False)``) and of the gathered report, and the ``ValueError`` messages of
bad set-ups (a process group of the wrong size, a ``mass_reduce`` over another world size, a
cache made for another world size, a process group given for a model that is not sharded).
``--no-reduce`` budgets every rank on its own heads (an identity ``mass_reduce``: the bug).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zipvl.testing.lvlm import _quiet_generation_config, _seeded, _text_kwargs

__all__ = ["PROMPT_LEN", "main", "prompt_ids", "save_uneven_heads_model"]

PROMPT_LEN = 160
NEW_TOKENS = 6
TAU = 0.9


def save_uneven_heads_model(
    path: str | Path, *, num_layers: int = 3, kv_heads: int = 2, seed: int = 0
) -> Path:
    """Write a tiny random Qwen2 (hidden 64, 4 query heads) whose KV heads differ in
    peakedness: the key projection (weight and bias) of KV head h is scaled by
    ``100 ** (1 - h / (H - 1))``: x100 for the first head (peaked attention: random weights
    give near-uniform attention otherwise), x1 for the last (near-uniform).

    Returns:
        ``path`` (a ``save_pretrained`` directory).
    """
    from zipvl.cache.hf_compat import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_text_kwargs(num_layers, 64, 4, kv_heads))
    with _seeded(seed):
        model: Any = Qwen2ForCausalLM(cfg)
    head_dim = 64 // 4
    with torch.no_grad():
        for layer in model.model.layers:
            proj = layer.self_attn.k_proj
            for h in range(kv_heads):
                scale = 100.0 ** (1 - h / max(kv_heads - 1, 1))
                rows = slice(h * head_dim, (h + 1) * head_dim)
                proj.weight[rows] *= scale
                if proj.bias is not None:
                    proj.bias[rows] *= scale
    _quiet_generation_config(model)
    model.save_pretrained(path)
    return Path(path)


def prompt_ids(length: int = PROMPT_LEN, *, seed: int = 1) -> Tensor:
    """A seeded (1, length) prompt of text tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, length), generator=g)


def _run(model: Any, config: Any, ids: Tensor, **enable_kwargs: Any) -> dict[str, Any]:
    """Greedy tokens and the kept tokens per layer of one preset."""
    import zipvl

    cache = zipvl.enable(model, config, **enable_kwargs)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, **zipvl.cache_kwargs(model, cache)
        )
    local = cache.report(gather=False)
    whole = cache.report()
    zipvl.disable(model)
    return {
        "tokens": out[0, ids.shape[1] :].tolist(),
        "kept": [r.kept_tokens for r in local.layers],
        "whole_kept": [r.kept_tokens for r in whole.layers],
        "bytes": local.bytes,
        "whole_bytes": whole.bytes,
        "world_size": whole.world_size,
        "rank_kept": [[r.kept_tokens for r in rep.layers] for rep in whole.ranks],
    }


def _error(call: Callable[[], object]) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    return "no error"


def main(argv: list[str] | None = None) -> int:
    """Entry point under ``torchrun`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m zipvl.testing.tensor_parallel")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--no-reduce", action="store_true")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    import zipvl
    from zipvl.cache.hf_compat import Qwen2ForCausalLM
    from zipvl.config import ZipVLConfig
    from zipvl.models import make_cache
    from zipvl.sparsity import AllReduceMass

    torch.set_num_threads(1)
    tp = Qwen2ForCausalLM.from_pretrained(args.checkpoint, tp_plan="auto", dtype=torch.float32)
    whole = Qwen2ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    tp.eval()
    whole.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = prompt_ids()
    dense, sparse = ZipVLConfig.preset("dense"), ZipVLConfig.preset("zipvl", tau=TAU)
    extra: dict[str, Any] = {}
    if args.no_reduce:
        extra["mass_reduce"] = lambda mass: mass  # every rank budgets its own heads
    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "tp_size": tp.tp_size,
        "dense_tp": _run(tp, dense, ids, **extra),
        "dense_whole": _run(whole, dense, ids),
        "zipvl_tp": _run(tp, sparse, ids, **extra),
        "zipvl_whole": _run(whole, sparse, ids),
    }
    # bad set-ups: every rank creates every single-rank group (new_group is collective)
    singles = [dist.new_group([r]) for r in range(world)]
    mine = singles[rank]
    errors = {
        "process_group_size": _error(lambda: zipvl.enable(tp, sparse, process_group=mine)),
        "mass_reduce_size": _error(
            lambda: zipvl.enable(tp, sparse, mass_reduce=AllReduceMass(mine))
        ),
        "not_sharded": _error(lambda: zipvl.enable(whole, sparse, process_group=dist.group.WORLD)),
    }
    # a cache made for another world size, bound by hand (enable always builds a matching one)
    from zipvl.models.hf import _function_of

    zipvl.enable(tp, sparse)
    fn = _function_of(tp.get_decoder())
    assert fn is not None
    fn.cache = make_cache(
        sparse, fn.num_layers, update_reads="none", mass_reduce=AllReduceMass(mine)
    )
    errors["cache_world_size"] = _error(
        lambda: tp(ids, **zipvl.cache_kwargs(tp, fn.cache))  # type: ignore[union-attr]
    )
    zipvl.disable(tp)
    result["errors"] = errors
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"tensor-parallel check: {world} ranks wrote {out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
