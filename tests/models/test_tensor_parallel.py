"""``zipvl.enable`` on a model sharded by transformers (``tp_plan="auto"``) over 2 CPU processes
(gloo, launched with torchrun), against the same checkpoint loaded whole in one process.

The checkpoint's KV heads differ in peakedness (``save_uneven_heads_model``), so a rank that
budgets on its own heads keeps a different count than the whole model: the un-reduced run
(``--no-reduce``) is checked to show it, which is what makes the reduced run's agreement mean
something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zipvl.cache.report import CacheReport, LayerReport
from zipvl.testing.tensor_parallel import save_uneven_heads_model

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _torchrun(args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every rank's results, reduced (``"reduce"``) and un-reduced (``"no_reduce"``)."""
    tmp = tmp_path_factory.mktemp("tp")
    ckpt = save_uneven_heads_model(tmp / "ckpt")
    out: dict[str, list[dict]] = {}
    for name, flags in (("reduce", []), ("no_reduce", ["--no-reduce"])):
        where = tmp / name
        proc = _torchrun(["-m", "zipvl.testing.tensor_parallel", str(ckpt), str(where), *flags])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = [json.loads((where / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out


def test_the_model_is_sharded(ranks: dict[str, list[dict]]) -> None:
    for r, res in enumerate(ranks["reduce"]):
        assert (res["rank"], res["world_size"], res["tp_size"]) == (r, WORLD, WORLD)
        # each rank's cache holds half the heads: about half the bytes of the whole model's
        assert res["dense_tp"]["bytes"] * 2 == res["dense_whole"]["bytes"]


def test_dense_preset_is_token_identical_to_one_process(ranks: dict[str, list[dict]]) -> None:
    for res in ranks["reduce"]:
        assert res["dense_tp"]["tokens"] == res["dense_whole"]["tokens"]
        assert res["dense_tp"]["whole_bytes"] == res["dense_whole"]["bytes"]


def test_every_rank_keeps_what_one_process_keeps(ranks: dict[str, list[dict]]) -> None:
    single = ranks["reduce"][0]["zipvl_whole"]["kept"]
    assert min(single) < ranks["reduce"][0]["dense_whole"]["kept"][0]  # it does sparsify
    for res in ranks["reduce"]:
        tp = res["zipvl_tp"]
        assert tp["kept"] == single  # this rank's own budget per layer
        assert tp["rank_kept"] == [single] * WORLD  # every rank's, gathered
        assert tp["whole_kept"] == single and tp["world_size"] == WORLD
        assert tp["tokens"] == res["zipvl_whole"]["tokens"]


def test_without_the_reduction_the_ranks_disagree(ranks: dict[str, list[dict]]) -> None:
    """The check above is discriminating: budgeting each rank on its own heads (the bug the
    reduction fixes) gives other counts, different on the two ranks."""
    single = ranks["no_reduce"][0]["zipvl_whole"]["kept"]
    kept = [res["zipvl_tp"]["kept"] for res in ranks["no_reduce"]]
    assert kept[0] != kept[1]
    assert all(k != single for k in kept)


def test_bad_set_ups_raise_value_errors(ranks: dict[str, list[dict]]) -> None:
    for res in ranks["reduce"]:
        err = res["errors"]
        assert err["process_group_size"].startswith(
            "process_group: expected a group of 2 ranks (the model's tensor-parallel size"
        )
        assert err["mass_reduce_size"].startswith("mass_reduce: expected a reduction over 2 ranks")
        assert err["not_sharded"].startswith("process_group: expected a group of 1 ranks")
        assert err["cache_world_size"].startswith(
            "cache: expected a ZipVLCache for KV heads split over 2 processes"
        )


def _layer(i: int, kept: int, nbytes: int, bits: dict[int, float]) -> LayerReport:
    return LayerReport(
        layer=i,
        prompt_tokens=100,
        kept_tokens=kept,
        kept_ratio=kept / 100,
        attn_flop_reduction=1 - (kept / 100) ** 2,
        seq_length=104,
        tokens_at_bits=bits,
        decode_blocks=1,
        decode_block_tokens=4,
        decode_kept_tokens=float(kept % 5),
        bytes=nbytes,
        bf16_bytes=2 * nbytes,
        storage="paged",
        decode_read="fused",
    )


def test_merge_sums_bytes_and_averages_per_row_counts() -> None:
    a = CacheReport(layers=(_layer(0, 60, 1000, {4: 60, 2: 40, 16: 4}),), rank=0)
    b = CacheReport(layers=(_layer(0, 62, 3000, {4: 62, 2: 38, 16: 4}),), rank=1)
    whole = CacheReport.merge((a, b), rank=1)
    row = whole.layers[0]
    assert (whole.rank, whole.world_size, whole.ranks) == (1, 2, (a, b))
    assert (row.kept_tokens, row.kept_ratio) == (61, 0.61)
    assert row.tokens_at_bits == {2: 39, 4: 61, 16: 4}
    assert (row.bytes, row.bf16_bytes, row.live_bytes) == (4000, 8000, 4000)
    assert row.decode_kept_tokens == 1.0 and row.seq_length == 104
    with pytest.raises(ValueError, match=r"ranks: expected every rank to report layers \[0\]"):
        CacheReport.merge((a, CacheReport(layers=())))
    with pytest.raises(ValueError, match="ranks: expected one report per rank"):
        CacheReport.merge(())


def test_enable_arguments_checked_in_one_process() -> None:
    import zipvl
    from zipvl.cache.hf_compat import tensor_parallel
    from zipvl.testing.lvlm import build_tiny_model

    model = build_tiny_model("qwen2")
    assert tensor_parallel(model) is None
    with pytest.raises(ValueError, match="process_group, mass_reduce: expected at most one"):
        zipvl.enable(model, process_group=object(), mass_reduce=lambda m: m)
    with pytest.raises(TypeError, match="mass_reduce: expected None or a callable"):
        zipvl.enable(model, mass_reduce="sum")  # type: ignore[arg-type]
    assert not zipvl.models.is_enabled(model)
