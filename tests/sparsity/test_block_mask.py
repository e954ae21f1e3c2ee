"""BlockMask builders against dense oracles: tile level (to_dense) and token level (mask_mod)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.nn.attention.flex_attention import BlockMask, create_mask

from zipvl.sparsity import (
    Selection,
    TopKSelector,
    causal_mask_mod,
    compacted_causal_block_mask,
    compacted_prefix_block_mask,
    selection_block_mask,
)
from zipvl.sparsity.reference import selection_dense_mask
from zipvl.testing.attention import dense_selection_mask
from zipvl.testing.inputs import random_scores

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
block_sizes = st.sampled_from([1, 4, 8, 16])


def tiles_of(dense: torch.Tensor, bs: int) -> torch.Tensor:
    """(..., Q, KV) bool -> (..., ceil(Q/bs), ceil(KV/bs)): tile has any True."""
    *lead, nq_tok, nkv_tok = dense.shape
    nq, nkv = -(-nq_tok // bs), -(-nkv_tok // bs)
    padded = torch.zeros(*lead, nq * bs, nkv * bs, dtype=torch.bool, device=dense.device)
    padded[..., :nq_tok, :nkv_tok] = dense
    return padded.view(*lead, nq, bs, nkv, bs).any(-1).any(-2)


def full_tiles(bm: BlockMask) -> torch.Tensor:
    """Dense (B, H, Nq, Nkv) bool of the tiles listed as full."""
    assert bm.full_kv_num_blocks is not None and bm.full_kv_indices is not None
    num, idx = bm.full_kv_num_blocks, bm.full_kv_indices
    nkv = idx.shape[-1]
    slot = torch.arange(nkv, device=idx.device)
    listed = slot < num[..., None]  # (B, H, Nq, Nkv) over index slots
    out = torch.zeros(*idx.shape, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, idx.long(), listed) | out


def tiles_entirely_true(dense: torch.Tensor, bs: int) -> torch.Tensor:
    """Tiles where every in-range pair is True."""
    *lead, nq_tok, nkv_tok = dense.shape
    nq, nkv = -(-nq_tok // bs), -(-nkv_tok // bs)
    padded = torch.ones(*lead, nq * bs, nkv * bs, dtype=torch.bool, device=dense.device)
    padded[..., :nq_tok, :nkv_tok] = dense
    return padded.view(*lead, nq, bs, nkv, bs).all(-1).all(-2)


def check_block_mask(
    bm: BlockMask, oracle: torch.Tensor, bs: int, *, every_full_tile_listed: bool = True
) -> None:
    """oracle (B, H, Q, KV) bool: exact via mask_mod, tiles via to_dense, full tiles really full.

    ``every_full_tile_listed``: also require that every entirely-visible tile is listed as full
    (so the mask_mod is skipped wherever possible).
    """
    b, h, nq_tok, nkv_tok = oracle.shape
    dense = create_mask(bm.mask_mod, b, h, nq_tok, nkv_tok, device=oracle.device)
    assert torch.equal(dense, oracle), "mask_mod differs from the oracle"
    listed = bm.to_dense().bool()
    assert torch.equal(listed, tiles_of(oracle, bs).expand_as(listed)), "tile set differs"
    full = full_tiles(bm)
    entirely = tiles_entirely_true(oracle, bs).expand_as(full)
    assert not (full & ~entirely).any(), "a 'full' tile is not full"
    if every_full_tile_listed:
        assert torch.equal(full, entirely), "an entirely visible tile is listed as partial"


@FIXTURE_OK
@given(p=st.integers(1, 100), bs=st.sampled_from([4, 8, 16, 32]), extra=st.integers(0, 1))
def test_compacted_causal_block_mask(device: str, p: int, bs: int, extra: int) -> None:
    padded = (-(-p // bs) + extra) * bs
    bm = compacted_causal_block_mask(p, padded, bs, device=device)
    i = torch.arange(padded, device=device)
    oracle = (i[None, :] <= i[:, None]) & (i[None, :] < p)  # (Ppad, Ppad)
    check_block_mask(bm, oracle[None, None], bs)
    assert bm.seq_lengths == (padded, padded)


@FIXTURE_OK
@given(
    s=st.integers(1, 60),
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    frac=st.floats(0.0, 1.0),
    bs=block_sizes,
    unkept=st.sampled_from(["zero", "attend"]),
    seed=st.integers(0, 1000),
)
def test_selection_block_mask_matches_selection(
    device: str,
    s: int,
    b: int,
    hkv: int,
    group: int,
    frac: float,
    bs: int,
    unkept: str,
    seed: int,
) -> None:
    scores = random_scores(b, hkv, s, seed=seed, device=device)
    budget = torch.full((b, hkv), round(frac * s), dtype=torch.int32, device=device)
    sel = TopKSelector(keep_last=False)(scores, budget)
    bm = selection_block_mask(sel, bs, group_size=group, unkept=unkept)  # type: ignore[arg-type]
    oracle = dense_selection_mask(sel.keep, unkept=unkept)  # type: ignore[arg-type]
    # the library's reference mask agrees with the independent oracle
    assert torch.equal(selection_dense_mask(sel, unkept=unkept), oracle)  # type: ignore[arg-type]
    oracle = oracle.repeat_interleave(group, dim=1)  # (B, Hq, S, S)
    i = torch.arange(s, device=device)
    assert not (oracle & (i[None, :] > i[:, None])).any(), "causality"
    check_block_mask(bm, oracle, bs)
    # the mask_mod is safe on the padded tail of the last tile (kernels may evaluate it there)
    nb = -(-s // bs) * bs
    tail = create_mask(bm.mask_mod, b, hkv * group, nb, nb, device=device)
    assert not tail[..., :, s:].any()


@FIXTURE_OK
@given(
    s=st.integers(1, 60),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    frac=st.floats(0.0, 1.0),
    bs=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 1000),
)
def test_compacted_prefix_block_mask_is_attend_over_gathered_keys(
    device: str, s: int, hkv: int, group: int, frac: float, bs: int, seed: int
) -> None:
    scores = random_scores(1, hkv, s, seed=seed, device=device)
    budget = torch.full((1, hkv), max(1, round(frac * s)), dtype=torch.int32, device=device)
    sel = TopKSelector(keep_last=False)(scores, budget)
    p = sel.num_kept
    padded = -(-p // bs) * bs
    visible = sel.keep.cumsum(-1, dtype=torch.int32)
    bm = compacted_prefix_block_mask(visible, padded, bs, group_size=group)
    # oracle: query t sees gathered key c iff c < P and position(c) <= t
    pos = torch.full((1, hkv, padded), s, device=device, dtype=torch.int64)
    pos[..., :p] = sel.indices()
    t = torch.arange(s, device=device)
    oracle = pos[..., None, :] <= t[:, None]  # (1, Hkv, S, Ppad)
    # the last query block is padded with rows that see nothing, so it may stay partial
    check_block_mask(bm, oracle.repeat_interleave(group, dim=1), bs, every_full_tile_listed=False)


def test_causal_mask_mod_and_names() -> None:
    m = create_mask(causal_mask_mod(), 1, 1, 5, 5, device="cpu")
    assert torch.equal(m[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert causal_mask_mod().__name__ == "causal"
    bm = compacted_causal_block_mask(5, 8, 4)
    assert bm.mask_mod.__name__ == "compacted_causal"
    assert compacted_causal_block_mask(5, 8, 4) is bm, "cached per (P, padded, block, device)"


def test_block_mask_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"padded_len: expected a multiple of block_size \(4\)"):
        compacted_causal_block_mask(5, 6, 4)
    with pytest.raises(ValueError, match="padded_len: expected a multiple"):
        compacted_causal_block_mask(9, 8, 4)
    with pytest.raises(ValueError, match="num_kept: expected an int >= 1, got 0"):
        compacted_causal_block_mask(0, 8, 4)
    with pytest.raises(ValueError, match="visible: expected a 3-D tensor"):
        compacted_prefix_block_mask(torch.zeros(4, dtype=torch.int32), 8, 4)
    keep = torch.ones(1, 1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="unkept: expected 'zero' or 'attend'"):
        selection_block_mask(Selection(keep, 4), 4, unkept="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Selection\.keep: expected dtype in"):
        selection_block_mask(Selection(keep.int(), 4), 4)  # refused by Selection itself
    with pytest.raises(TypeError, match="selection: expected a Selection"):
        selection_block_mask(keep, 4)  # type: ignore[arg-type]
