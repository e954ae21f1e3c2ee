"""The fused Triton probe scorer against the eager float64 column mass.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), at small shapes; the
interpreter's bf16 ``tl.dot`` is not faithful, so bf16 is checked on CUDA only.
"""

from __future__ import annotations

import pytest
import torch

from zipvl.sparsity import ProbeScorer
from zipvl.sparsity.probe_triton import (
    ProbeKernelConfig,
    probe_band_triton,
    probe_mass_triton,
    triton_probe_available,
)
from zipvl.sparsity.scorers import _probe_mass, probe_positions

# (B, Hq, Hkv, Sq, Skv, D): GQA, Sq < Skv, lengths that are not multiples of the 64-wide blocks
SHAPES = [(2, 4, 2, 37, 37, 16), (1, 6, 2, 50, 70, 32), (1, 4, 1, 130, 130, 16)]


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("shape", SHAPES)
def test_probe_mass_matches_float64(shape: tuple[int, ...], device: str) -> None:
    b, hq, hkv, sq, skv, d = shape
    rows = probe_positions(sq, recent_frac=0.2, random_frac=0.2, device=device)
    if not triton_probe_available(torch.device(device)):
        # CPU tensors on a CUDA machine (no interpreter): the fast path must refuse, not fall back
        q = torch.randn(b, hq, sq, d, device=device)
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            probe_mass_triton(q, q[:, :hkv], rows, scale=1.0)
        return
    for dtype in _dtypes(device):
        q = torch.randn(b, hq, sq, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, skv, d, device=device, dtype=dtype)
        ref = _probe_mass(q.double(), k.double(), rows, scale=d**-0.5, heads_per_chunk=1)
        eager = _probe_mass(q, k, rows, scale=d**-0.5, heads_per_chunk=1)
        got = probe_mass_triton(q, k, rows, scale=d**-0.5)
        split = probe_mass_triton(q, k, rows, scale=d**-0.5, key_splits=3)
        torch.testing.assert_close(split, got, rtol=1e-5, atol=1e-5)
        assert got.shape == (b, hkv, skv) and got.dtype == torch.float32
        err = (got.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        # the 2x rule with a float32 rounding band (the fused path keeps fp32 logits)
        assert err <= 2 * eager_err + 1e-5, (dtype, err, eager_err)
        # each probe row's softmax sums to one: total mass = B * Hq * M
        total = got.sum().item()
        assert total == pytest.approx(b * hq * rows.numel(), rel=1e-4)


def test_probe_scorer_triton_impl_equals_torch_impl(device: str) -> None:
    if not triton_probe_available(torch.device(device)):
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            ProbeScorer(impl="triton")(torch.randn(1, 4, 45, 16), torch.randn(1, 2, 45, 16))
        return
    q = torch.randn(1, 4, 45, 16, device=device)
    k = torch.randn(1, 2, 45, 16, device=device)
    fast = ProbeScorer(recent_frac=0.1, random_frac=0.1, impl="triton")(q, k)
    slow = ProbeScorer(recent_frac=0.1, random_frac=0.1, impl="torch")(q, k)
    torch.testing.assert_close(fast.mass, slow.mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.normalized, slow.normalized, rtol=1e-5, atol=1e-5)


def test_probe_mass_triton_rejects_odd_head_dim() -> None:
    q = torch.randn(1, 2, 8, 12)
    k = torch.randn(1, 2, 8, 12)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        probe_mass_triton(q, k, torch.arange(8), scale=1.0)


def test_probe_scorer_rejects_unknown_impl() -> None:
    with pytest.raises(ValueError, match="impl"):
        ProbeScorer(impl="cuda-magic")  # type: ignore[arg-type]


@pytest.mark.parametrize("d", [16, 12])
def test_probe_scorer_auto_dispatch(d: int, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """impl='auto' runs the fused kernel for eager CUDA inputs with a power-of-two D >= 16 and
    the PyTorch path otherwise: the path that ran is recorded, and the scores equal those of
    the other implementation wherever both can run."""
    import zipvl.sparsity.probe_triton as probe_triton
    import zipvl.sparsity.scorers as scorers

    ran: list[str] = []
    torch_path, triton_path = scorers._probe_mass, probe_triton.probe_mass_triton

    def spy_torch(*args, **kwargs):  # type: ignore[no-untyped-def]
        ran.append("torch")
        return torch_path(*args, **kwargs)

    def spy_triton(*args, **kwargs):  # type: ignore[no-untyped-def]
        ran.append("triton")
        return triton_path(*args, **kwargs)

    monkeypatch.setattr(scorers, "_probe_mass", spy_torch)
    monkeypatch.setattr(probe_triton, "probe_mass_triton", spy_triton)
    q = torch.randn(1, 4, 45, d, device=device)
    k = torch.randn(1, 2, 45, d, device=device)
    auto = ProbeScorer(recent_frac=0.1, random_frac=0.1)(q, k)
    expected = "triton" if device == "cuda" and d == 16 else "torch"
    assert ran == [expected]
    other = "torch" if expected == "triton" else "triton"
    if other == "triton" and (d != 16 or not triton_probe_available(torch.device(device))):
        return  # the fused kernel cannot run here: nothing to compare against
    ran.clear()
    explicit = ProbeScorer(recent_frac=0.1, random_frac=0.1, impl=other)(q, k)  # type: ignore[arg-type]
    assert ran == [other]
    torch.testing.assert_close(auto.mass, explicit.mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto.normalized, explicit.normalized, rtol=1e-5, atol=1e-5)


KEY_BLOCK = ProbeKernelConfig().lse_block_n  # the row pass's key block
assert KEY_BLOCK == 64


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "skv"),
    [(1, 4, 2, 65, 65), (1, 2, 1, 40, 129), (2, 2, 2, 1, 65)],
)
def test_probe_mass_when_the_last_key_opens_a_block(
    b: int, hq: int, hkv: int, sq: int, skv: int, device: str
) -> None:
    """``Skv - 1`` a multiple of the key block: the last probe's own key (position Skv - 1) is
    the only key of the last block, which the key loop must still visit."""
    assert (skv - 1) % KEY_BLOCK == 0
    if not triton_probe_available(torch.device(device)):
        pytest.skip("no Triton on this device without the interpreter")
    d = 16
    rows = probe_positions(sq, recent_frac=0.2, random_frac=0.2, min_probes=1, device=device)
    assert int(rows.max()) == sq - 1  # the last query row probes, at key position Skv - 1
    q = torch.randn(b, hq, sq, d, device=device)
    k = torch.randn(b, hkv, skv, d, device=device)
    k[..., -1, :] = 4.0 * q[:, :: hq // hkv, -1, :]  # the last key matters to the last probe
    ref = _probe_mass(q.double(), k.double(), rows, scale=d**-0.5, heads_per_chunk=1)
    for splits in (None, 2):
        got = probe_mass_triton(q, k, rows, scale=d**-0.5, key_splits=splits)
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-4)
        assert got.sum().item() == pytest.approx(b * hq * rows.numel(), rel=1e-4)


# every launch setting is another code path: row chunks larger / smaller than the column pass's
# chunks, key blocks smaller than the shapes (so unmasked, boundary and empty tiles all occur)
CONFIGS = {
    "default": ProbeKernelConfig(),
    "lse_chunks_below_col": ProbeKernelConfig(
        lse_block_m=16, lse_block_n=16, lse_warps=4, col_block_n=16, col_block_m=32, col_warps=4
    ),
    "lse_chunks_above_col": ProbeKernelConfig(
        lse_block_m=64, lse_block_n=16, lse_warps=4, col_block_n=32, col_block_m=16, col_warps=4
    ),
    "stages2": ProbeKernelConfig(
        lse_block_m=32,
        lse_block_n=32,
        lse_warps=4,
        lse_stages=2,
        col_block_n=64,
        col_block_m=32,
        col_warps=4,
        col_stages=2,
    ),
}


def _rows(kind: str, sq: int, device: str) -> torch.Tensor:
    rows = probe_positions(sq, recent_frac=0.15, random_frac=0.25, device=device)  # ascending
    if kind == "shuffled":  # any order, a duplicate, a strided view: only the skipped work
        gen = torch.Generator().manual_seed(1)  # may change
        perm = torch.randperm(rows.numel(), generator=gen).to(device)
        rows = torch.cat([rows[perm], rows[2:3]]).repeat_interleave(2)[::2]
    return rows


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rows_kind", ["ascending", "shuffled"])
def test_probe_mass_every_config_matches_float64(name: str, rows_kind: str, device: str) -> None:
    """Each launch setting, with several key splits (one, a few, more than the key blocks),
    against the float64 eager column mass: GQA, Sq < Skv, lengths off the block multiples."""
    if not triton_probe_available(torch.device(device)):
        pytest.skip("no Triton on this device without the interpreter")
    cfg = CONFIGS[name]
    # the interpreter's bf16 dot is not faithful: fp32 there (exact products), bf16 on CUDA
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, hq, hkv, sq, skv, d = 2, 6, 2, 50, 110, 16
    rows = _rows(rows_kind, sq, device)
    q = torch.randn(b, hq, sq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, skv, d, device=device, dtype=dtype)
    ref = _probe_mass(q.double(), k.double(), rows, scale=d**-0.5, heads_per_chunk=1)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for splits in (None, 2, 64):
        got = probe_mass_triton(q, k, rows, scale=d**-0.5, key_splits=splits, config=cfg)
        assert got.shape == (b, hkv, skv) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol)
        assert got.sum().item() == pytest.approx(b * hq * rows.numel(), rel=1e-4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("lse_block_m", 48), ("col_block_n", 8), ("col_warps", 3), ("lse_stages", 0)],
)
def test_probe_kernel_config_rejects_bad_settings(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        ProbeKernelConfig(**{field: value})


def test_probe_mass_triton_rejects_a_non_positive_scale() -> None:
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="scale"):
        probe_mass_triton(q, q, torch.arange(8), scale=-1.0)


def test_probe_kernel_default_for_fits_dtype_and_head_dim() -> None:
    """16-bit heads up to 256 get the class defaults; float32 and wider heads smaller tiles."""
    assert ProbeKernelConfig.default_for(torch.bfloat16, 128) == ProbeKernelConfig()
    assert ProbeKernelConfig.default_for(torch.float16, 256) == ProbeKernelConfig()
    fp32 = ProbeKernelConfig.default_for(torch.float32, 128)
    wide = ProbeKernelConfig.default_for(torch.bfloat16, 512)
    for cfg in (fp32, wide):
        assert cfg.lse_block_m < 128 and cfg.col_block_n < 128 and cfg.lse_warps == 4


def test_probe_mass_triton_without_probe_rows_is_zero(device: str) -> None:
    if not triton_probe_available(torch.device(device)):
        pytest.skip("no Triton on this device without the interpreter")
    q = torch.randn(1, 4, 8, 16, device=device)
    got = probe_mass_triton(q, q[:, :2], torch.zeros(0, dtype=torch.int64), scale=0.25)
    assert got.shape == (1, 2, 8) and not got.any()


@pytest.mark.parametrize("sq", [45, 30])  # a prefill, and the last 30 rows of a longer sequence
def test_outputs_in_place_and_inputs_by_address(sq: int, device: str) -> None:
    """``out`` / ``normalized`` are written in place over stale contents, Eq. 7 from the column
    pass equals the scorer's plain division bit for bit, and with ``addr`` the kernels read the
    inputs at those addresses, not at the (zero) tensors that only give shapes and strides."""
    if not triton_probe_available(torch.device(device)):
        pytest.skip("no Triton on this device without the interpreter")
    from zipvl.sparsity.scorers import _causal_visible

    skv, d = 45, 16
    q = torch.randn(1, 4, 20 + skv, d, device=device)[:, :, -sq:]  # strided: a view of a longer q
    k = torch.randn(1, 2, skv, d, device=device)
    rows = probe_positions(sq, recent_frac=0.2, random_frac=0.2, device=device)
    want = probe_mass_triton(q, k, rows, scale=0.25)
    mass, nrm = torch.full_like(want, float("nan")), torch.full_like(want, float("nan"))
    got = probe_mass_triton(q, k, rows, scale=0.25, out=mass, normalized=nrm)
    assert got is mass and torch.equal(mass, want)
    assert torch.equal(nrm, want / _causal_visible(sq, skv, k.device))
    addr = torch.tensor([q.data_ptr(), k.data_ptr()], device=device)
    stand_q = torch.zeros(1, 4, 20 + skv, d, device=device)[:, :, -sq:]
    by_addr = probe_mass_triton(stand_q, torch.zeros_like(k), rows, scale=0.25, addr=addr)
    assert torch.equal(by_addr, want)
    scorer = ProbeScorer(recent_frac=0.2, random_frac=0.2, scale=0.25, impl="triton")
    fused = scorer.fused_scores(stand_q, torch.zeros_like(k), addr=addr)
    plain = ProbeScorer(recent_frac=0.2, random_frac=0.2, scale=0.25, impl="torch")(q, k)
    torch.testing.assert_close(fused.normalized, plain.normalized, rtol=1e-5, atol=1e-6)


def test_in_place_and_address_arguments_are_checked() -> None:
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    rows = torch.arange(4)
    with pytest.raises(ValueError, match=r"out: expected a contiguous \(1, 2, 8\) float32"):
        probe_mass_triton(q, k, rows, scale=0.25, out=torch.empty(1, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"normalized: expected a contiguous"):
        probe_mass_triton(q, k, rows, scale=0.25, normalized=torch.empty(2, 8))
    with pytest.raises(ValueError, match=r"addr: expected a contiguous \(2,\) int64 tensor"):
        probe_mass_triton(q, k, rows, scale=0.25, addr=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"addr: inputs read by address need a last stride"):
        strided = torch.randn(1, 4, 8, 32)[..., ::2]  # (1, 4, 8, 16), last stride 2
        probe_mass_triton(strided, k, rows, scale=0.25, addr=torch.zeros(2).long())
    with pytest.raises(ValueError, match=r"weights: expected a contiguous \(4,\) float32"):
        probe_mass_triton(q, k, rows, scale=0.25, weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"weights: .* got a non-contiguous \(4,\) float32"):
        probe_mass_triton(q, k, rows, scale=0.25, weights=torch.ones(8)[::2])
    with pytest.raises(ValueError, match=r"lse: expected a contiguous \(1, 2, 4, 2\) float32"):
        probe_mass_triton(q, k, rows, scale=0.25, lse=torch.empty(1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"denominator: fused_scores computes 'causal' only"):
        ProbeScorer(denominator="probe_count").fused_scores(q, k)
    with pytest.raises(ValueError, match=r"impl: fused_scores runs the fused kernels"):
        ProbeScorer(impl="torch").fused_scores(q, k)
    with pytest.raises(ValueError, match=r"mass: expected a contiguous \(1, 2, 8\) float32"):
        ProbeScorer.estimator_preset(8, impl="triton").fused_scores(q, k, mass=torch.empty(2, 8))
    lse = torch.zeros(1, 2, 4, 2)
    with pytest.raises(ValueError, match=r"width: expected an int >= 1"):
        probe_band_triton(q, k, rows, lse, width=0, scale=0.25)
    with pytest.raises(ValueError, match=r"lse: expected a contiguous \(1, 2, 4, 2\) float32"):
        probe_band_triton(q, k, rows, lse[..., :1], width=4, scale=0.25)
    with pytest.raises(ValueError, match=r"addr: expected a contiguous \(2,\) int64"):
        probe_band_triton(q, k, rows, lse, width=4, scale=0.25, addr=torch.zeros(2))


@pytest.mark.parametrize(("sq", "width"), [(45, 7), (30, 20)])  # prefill; chunked, W > block
def test_the_band_kernel_equals_the_eager_band(sq: int, width: int, device: str) -> None:
    """``probe_band_triton`` (read in place, and by address) against ``_probe_mass_and_band``'s
    band in float64, with the row log-sum-exp the mass kernels return; rows near the start
    have offsets before the first key (0)."""
    if not triton_probe_available(torch.device(device)):
        pytest.skip("no Triton on this device without the interpreter")
    from zipvl.sparsity.scorers import _probe_mass_and_band

    skv, d = 45, 16
    q = torch.randn(2, 6, 20 + skv, d, device=device)[:, :, -sq:]
    k = torch.randn(2, 2, skv, d, device=device)
    rows = torch.tensor([0, 3, 11, sq - 1], device=device)
    weights = torch.rand(4, device=device) + 0.5
    lse = torch.empty(2, 2, 4, 3, device=device)
    ht = probe_mass_triton(q, k, rows, scale=0.25, weights=weights, lse=lse)
    want_ht, want = _probe_mass_and_band(
        q.double(), k.double(), rows, weights, width=width, scale=0.25,
        heads_per_chunk=1,
    )  # fmt: skip
    torch.testing.assert_close(ht.double(), want_ht.double(), rtol=1e-5, atol=1e-6)
    got = probe_band_triton(q, k, rows, lse, width=width, scale=0.25)
    assert got.shape == (2, 2, 4, width)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    addr = torch.tensor([q.data_ptr(), k.data_ptr()], device=device)
    stand_q = torch.zeros(2, 6, 20 + skv, d, device=device)[:, :, -sq:]
    by_addr = probe_band_triton(stand_q, torch.zeros_like(k), rows, lse, width=width,
                                scale=0.25, addr=addr)  # fmt: skip
    assert torch.equal(by_addr, got)
