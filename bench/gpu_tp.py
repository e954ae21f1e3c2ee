"""Tensor-parallel ZipVL on GPUs: a Qwen2 with 72B-class attention, TP=2 vs TP=2 dense vs 1 GPU.

What: for prompts of ``--lengths`` tokens (default 32k and 128k), the prefill time, the decode time
per token, the peak memory of every GPU, and the all-reduce of the attention mass (the one
collective ZipVL adds per layer plan) as a share of the prefill and decode time, for

    tp-zipvl    the model sharded over the torchrun processes (``tp_plan="auto"``), with
                ``zipvl.enable(model, ZipVLConfig.preset("zipvl"))``: every rank holds half the
                heads; the mass is all-reduced before each layer's budget is chosen
    tp-dense    the same sharded model without zipvl (transformers SDPA + ``DynamicCache``)
    1gpu-zipvl  the whole model on rank 0's GPU with zipvl (skipped with ``--no-single`` or when
                it runs out of memory: reported as OOM)
    1gpu-dense  the whole model on rank 0's GPU without zipvl (the 1-GPU baseline)

Model: Qwen2 with Qwen2-72B attention and MLP shapes (hidden 8192, 64 query heads, 8 KV heads,
head dim 128, MLP 29568), ``--layers`` (default 16: about 28 GB of bf16 weights, 14 GB per GPU
at TP=2), the vocabulary cut to ``--vocab``. Random weights, normal(0, 0.02), written once by
rank 0 to ``--ckpt`` (reused when it holds a checkpoint of the same shapes) and loaded by every
rank with ``tp_plan="auto"``. Random weights give nearly flat attention, so the tau rule keeps
most tokens; the kept ratio is reported.

How: prefill = one ``model(ids, cache, logits_to_keep=1)`` between a barrier and a CUDA sync,
timed with CUDA events; the slowest rank's time is reported. Decode = ``--steps`` greedy steps
after the prefill, median ms per token. The all-reduce is timed by wrapping ``AllReduceMass`` with
CUDA events around each call (``TimedAllReduce``, passed as ``mass_reduce=``): its share is the
summed event time over the prefill (or decode) time on this rank, max over ranks. Peak memory is
``torch.cuda.max_memory_allocated`` per rank over the prefill and decode of one case.

Run:  torchrun --nproc-per-node 2 bench/gpu_tp.py                      (NCCL, 2 GPUs)
      torchrun --nproc-per-node 2 bench/gpu_tp.py --lengths 32768 --layers 8 --no-single
      torchrun --nproc-per-node 2 bench/gpu_tp.py --tiny --device cpu  (gloo smoke run)
      torchrun --nproc-per-node 1 bench/gpu_tp.py --variants 1gpu-zipvl 1gpu-dense  (one GPU only)
Prints the table on rank 0 and, as its last line, one JSON document (also $OUT/gpu_tp.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, markdown_table, progress, write_result

from zipvl.sparsity import AllReduceMass

VARIANTS = ("tp-zipvl", "tp-dense", "1gpu-zipvl", "1gpu-dense")

SHAPES_72B = dict(
    hidden_size=8192,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=29568,
)
SHAPES_TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=128,
)


@dataclass(frozen=True)
class Case:
    variant: str
    length: int


@dataclass
class Result:
    variant: str
    length: int
    prefill_ms: float | None = None
    decode_ms: float | None = None
    peak_gib: list[float] = field(default_factory=list)
    reduce_ms_prefill: float | None = None
    reduce_share_prefill: float | None = None
    reduce_share_decode: float | None = None
    reduce_calls_prefill: int | None = None
    kept_ratio: float | None = None
    status: str = "ok"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tensor-parallel ZipVL vs dense vs one GPU (run under torchrun).",
        epilog="Example: torchrun --nproc-per-node 2 bench/gpu_tp.py --lengths 32768 131072",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--layers", type=int, default=16, help="decoder layers (default 16)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup-length", type=int, default=2048)
    p.add_argument("--preset", default="zipvl", help="ZipVLConfig preset of the zipvl rows")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--no-single", action="store_true", help="skip the 1-GPU baseline")
    p.add_argument("--ckpt", default="/tmp/zipvl_gpu_tp_ckpt", help="checkpoint directory")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.no_single:
        args.variants = [v for v in args.variants if not v.startswith("1gpu-")]
    return args


# ------------------------------------------------------------------------------------------------
# the all-reduce, timed
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedAllReduce(AllReduceMass):
    """``AllReduceMass`` that records a CUDA (start, end) event pair around every call."""

    cuda: bool = True
    events: list = field(default_factory=list, compare=False)

    def __call__(self, mass: torch.Tensor, /) -> torch.Tensor:
        if not self.cuda:
            return super().__call__(mass)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        total = super().__call__(mass)
        end.record()
        self.events.append((start, end))
        return total

    def elapsed_ms(self) -> tuple[float, int]:
        """Summed time of the calls since the last read, and their count."""
        torch.cuda.synchronize()
        ms = sum(s.elapsed_time(e) for s, e in self.events)
        n = len(self.events)
        self.events.clear()
        return ms, n


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    import transformers

    shapes = SHAPES_TINY if args.tiny else SHAPES_72B
    return transformers.Qwen2Config(
        **shapes,
        num_hidden_layers=2 if args.tiny else args.layers,
        vocab_size=min(args.vocab, 512) if args.tiny else args.vocab,
        max_position_embeddings=max(args.lengths) + args.steps + 1024,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def write_checkpoint(args: argparse.Namespace, rank: int) -> Path:
    """Rank 0 writes the random checkpoint (reused when its config matches); all ranks wait."""
    import torch.distributed as dist
    import transformers

    ckpt = Path(args.ckpt)
    cfg = _config(args)
    if rank == 0:
        old = ckpt / "config.json"
        same = old.is_file() and transformers.Qwen2Config.from_json_file(old).to_diff_dict() == (
            cfg.to_diff_dict()
        )
        if not same:
            progress(f"writing a random checkpoint to {ckpt}")
            dev = "cuda:0" if args.device == "cuda" else "cpu"
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device(dev):
                    model = transformers.Qwen2ForCausalLM(cfg)
            finally:
                torch.set_default_dtype(default)
            gen = torch.Generator(device=dev).manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.ndim >= 2:
                        param.normal_(0.0, 0.02, generator=gen)
                    else:
                        param.fill_(1.0 if "norm" in name else 0.0)
            model.save_pretrained(ckpt)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
    dist.barrier()
    return ckpt


def load(ckpt: Path, *, tp: bool, device: str) -> Any:
    import transformers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kw: dict[str, Any] = {"tp_plan": "auto"} if tp else {"device_map": _local_device(device)}
    model = transformers.Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype, **kw)
    return model.eval()


def _local_device(device: str) -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        import time

        if self.cuda:
            torch.cuda.synchronize()
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


def run_case(model: Any, case: Case, args: argparse.Namespace, group: Any, single: bool) -> Result:
    """Prefill + ``--steps`` decode steps of one case on this rank."""
    import torch.distributed as dist

    import zipvl
    from zipvl.config import ZipVLConfig

    dev = _local_device(args.device)
    clock = _Clock(args.device)
    res = Result(case.variant, case.length)
    gen = torch.Generator().manual_seed(case.length)
    ids = torch.randint(3, model.config.vocab_size, (1, case.length), generator=gen).to(dev)
    reduce = None
    if case.variant.endswith("zipvl"):
        config = ZipVLConfig.preset(args.preset)
        if not single:
            reduce = TimedAllReduce(group, cuda=args.device == "cuda")
        cache = zipvl.enable(model, config, mass_reduce=reduce)
    else:
        cache = None
    kw = zipvl.cache_kwargs(model, cache) if cache is not None else {}
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            if not single:
                dist.barrier(group=group)
            ms, out = clock.time(lambda: model(ids, use_cache=True, logits_to_keep=1, **kw))
            res.prefill_ms = ms
            if reduce is not None and args.device == "cuda":
                red_ms, calls = reduce.elapsed_ms()
                res.reduce_ms_prefill, res.reduce_calls_prefill = red_ms, calls
                res.reduce_share_prefill = red_ms / ms
            past = out.past_key_values if cache is None else cache
            step_kw = zipvl.cache_kwargs(model, past)
            token = out.logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(args.steps):
                ms, out = clock.time(lambda: model(token, use_cache=True, **step_kw))
                steps.append(ms)
                token = out.logits[:, -1:].argmax(-1)
            res.decode_ms = statistics.median(steps)
            if reduce is not None and args.device == "cuda":
                red_ms, _ = reduce.elapsed_ms()
                res.reduce_share_decode = red_ms / sum(steps)
            if cache is not None:
                report = cache.report(gather=not single)
                res.kept_ratio = report.kept_ratio
    except torch.OutOfMemoryError:
        res.status = "OOM"
    finally:
        if cache is not None:
            zipvl.disable(model)
    if args.device == "cuda":
        res.peak_gib = [torch.cuda.max_memory_allocated() / 2**30]
    return res


def _merge(results: list[Result]) -> Result:
    """One row from every rank's result: the slowest time, every rank's peak memory."""
    first = results[0]

    def worst(name: str) -> float | None:
        values = [getattr(r, name) for r in results if getattr(r, name) is not None]
        return max(values) if values else None

    return Result(
        variant=first.variant,
        length=first.length,
        prefill_ms=worst("prefill_ms"),
        decode_ms=worst("decode_ms"),
        peak_gib=[g for r in results for g in r.peak_gib],
        reduce_ms_prefill=worst("reduce_ms_prefill"),
        reduce_share_prefill=worst("reduce_share_prefill"),
        reduce_share_decode=worst("reduce_share_decode"),
        reduce_calls_prefill=first.reduce_calls_prefill,
        kept_ratio=first.kept_ratio,
        status="OOM" if any(r.status == "OOM" for r in results) else first.status,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("gpu_tp.py: run it under torchrun, e.g. torchrun --nproc-per-node 2 ...")
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)  # transformers reuses it
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = write_checkpoint(args, rank)
    rows: list[Result] = []
    tp_variants = [v for v in args.variants if v.startswith("tp-")]
    if tp_variants and world < 2:
        raise SystemExit(f"gpu_tp.py: {tp_variants} need >= 2 ranks; one rank runs --variants "
                         "1gpu-zipvl 1gpu-dense")  # fmt: skip
    if tp_variants:
        tp_model = load(ckpt, tp=True, device=args.device)
        from zipvl.cache.hf_compat import tensor_parallel

        found = tensor_parallel(tp_model)
        assert found is not None and found[0] == world, (found, world)
        group = found[1]
        for variant in tp_variants:
            # warm-up at a short length, then the cases
            run_case(tp_model, Case(variant, args.warmup_length), args, group, single=False)
            for length in args.lengths:
                progress(f"rank {rank}: {variant} at {length} tokens")
                mine = run_case(tp_model, Case(variant, length), args, group, single=False)
                everyone: list[Any] = [None] * world
                dist.all_gather_object(everyone, mine)
                rows.append(_merge(everyone))
        del tp_model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    singles = [v for v in args.variants if v.startswith("1gpu-")]
    if singles:
        if rank == 0:
            try:
                whole = load(ckpt, tp=False, device=args.device)
            except torch.OutOfMemoryError:
                whole = None
                rows += [Result(v, n, status="OOM") for v in singles for n in args.lengths]
            for variant in singles if whole is not None else []:
                run_case(whole, Case(variant, args.warmup_length), args, None, single=True)
                for length in args.lengths:
                    progress(f"rank 0: {variant} at {length} tokens")
                    rows.append(run_case(whole, Case(variant, length), args, None, True))
            del whole
        dist.barrier()
    payload: dict[str, Any] = {}
    if rank == 0:
        table = [
            {
                "variant": r.variant,
                "length": r.length,
                "status": r.status,
                "prefill ms": r.prefill_ms,
                "decode ms/token": r.decode_ms,
                "peak GiB per GPU": "/".join(f"{g:.1f}" for g in r.peak_gib) or "-",
                "all-reduce ms (prefill)": r.reduce_ms_prefill,
                "all-reduce share prefill": r.reduce_share_prefill,
                "all-reduce share decode": r.reduce_share_decode,
                "kept ratio": r.kept_ratio,
            }
            for r in rows
        ]
        info = env_info()
        print(
            f"# gpu_tp: {world} ranks, {info['device']}, torch {info['torch']}, "
            f"transformers {info['transformers']}, commit {info['commit']}"
        )
        print(markdown_table(table))
        payload = {
            "env": info,
            "world_size": world,
            "layers": _config(args).num_hidden_layers,
            "shapes": SHAPES_TINY if args.tiny else SHAPES_72B,
            "rows": [r.__dict__ for r in rows],
            "repro": f"torchrun --nproc-per-node {world} " + " ".join(sys.argv),
        }
        write_result("gpu_tp", payload)
        if args.out:
            Path(args.out).write_text(json.dumps(payload, sort_keys=True) + "\n")
    dist.destroy_process_group()
    return payload


if __name__ == "__main__":
    main()
