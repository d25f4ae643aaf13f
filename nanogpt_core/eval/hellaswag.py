"""HellaSwag: four-way sentence completion, scored the way build-nanogpt scores it.

    python -m nanogpt_core.eval.hellaswag --checkpoint PATH [--data FILE] [--limit N] [--batch-size N] [--json]
    torchrun --standalone --nproc_per_node=2 -m nanogpt_core.eval.hellaswag --checkpoint PATH --data FILE

Where the examples come from (`--data`):
  FILE                   JSON lines, plain or gzipped, with `ctx`, `endings` and `label` on
                         every line: rowanz/hellaswag's `hellaswag_val.jsonl` as published,
                         or a stripped copy of it with only those fields (and `idx`)
  hf:Rowan/hellaswag     the Hugging Face copy, through `datasets.load_dataset`
  (none)                 the original file, downloaded once from the rowanz/hellaswag
                         repository into $NANOGPT_CACHE_DIR (else ~/.cache/nanogpt-pipeline)
  --benchmark demo-cloze an offline cloze set from the demo corpus (see eval/cloze.py),
                         always reported under that name, never as HellaSwag

Loading is in eval/loading.py, the scoring (and why it scores as it does) in eval/scoring.py;
this module joins them to a checkpoint and is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nanogpt_core.checkpoint import CheckpointError, load_checkpoint
from nanogpt_core.distributed import DistContext, setup_distributed, teardown_distributed
from nanogpt_core.eval.examples import BENCHMARKS, EvalDataError, EvalDataUnavailableError
from nanogpt_core.eval.loading import HF_DATASET, HF_PREFIX, load_eval_data
from nanogpt_core.eval.scoring import DEFAULT_BATCH_SIZE, evaluate_model


def evaluate_checkpoint(checkpoint_path: str | Path, data_path: str | Path | None = None, *,
                        benchmark: str | None = None, limit: int | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device = "cpu",
                        dist_ctx: DistContext | None = None) -> dict[str, Any]:
    """Score a checkpoint; the pipeline's entry point.

    `benchmark` is "hellaswag" or "demo-cloze". Without `data_path` it picks the data (the
    cached rowanz file, or the generated cloze set); with one, the file's own benchmark is
    used and a different `benchmark` is an error. None means "hellaswag unless the file says
    otherwise".
    """
    data = load_eval_data(data_path, benchmark)
    model, payload = load_checkpoint(checkpoint_path, map_location=device)
    report = evaluate_model(model, data, limit=limit, batch_size=batch_size, device=device, dist_ctx=dist_ctx)
    return {**report, "checkpoint": str(checkpoint_path), "checkpoint_step": payload.get("step")}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.eval.hellaswag",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="model_NNNNN.pt to score")
    parser.add_argument("--data", default=None,
                        help=f"JSON-lines file (.jsonl or .jsonl.gz), or {HF_PREFIX}{HF_DATASET}; "
                             "default: the rowanz file, downloaded into the cache")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                        help="default: hellaswag, or whatever the --data file holds")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    ctx = setup_distributed(args.device)
    if ctx.device.type == "cpu" and ctx.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    started = time.perf_counter()
    try:
        report = evaluate_checkpoint(args.checkpoint, args.data, benchmark=args.benchmark, limit=args.limit,
                                     batch_size=args.batch_size, device=ctx.device, dist_ctx=ctx)
    except (EvalDataError, EvalDataUnavailableError, CheckpointError, ValueError) as e:
        teardown_distributed(after_error=True)
        sys.exit(f"error: {e}")
    seconds = time.perf_counter() - started
    teardown_distributed()
    if not ctx.is_main:
        return
    report.update(seconds=round(seconds, 3), examples_per_second=round(report["n"] / seconds, 3),
                  world_size=ctx.world_size, device=str(ctx.device), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['benchmark']}: acc {report['acc']:.4f}  acc_norm {report['acc_norm']:.4f}  "
              f"acc_char_norm {report['acc_char_norm']:.4f}  (n={report['n']}, {seconds:.1f} s)")
        print(f"data: {report['data']}  examples sha256 {report['examples_sha256'][:16]}")
        if report["n_truncated"]:
            print(f"contexts shortened to fit the model: {report['n_truncated']}")


if __name__ == "__main__":
    main()
