"""HellaSwag scoring throughput: the batched scorer against one example per forward pass.

The baseline is build-nanogpt's method: each example is one forward pass over four rows
(context + ending, zero-padded to the longest), the output layer at every position. The
batched scorer packs each example into one row (context once, endings behind it, a mask
keeping the endings apart), runs many rows per forward pass and applies the output layer
only where an ending token is predicted. A middle row, the packed layout one example at a
time, shows how much of the gain comes from the layout and how much from batching.

Same random-weight model for all three, same examples; the picks must agree exactly and the
summed losses to 1e-5 (relative), or the script fails. The examples are timed in rounds of
`--batch-size` examples of similar length (as the scorer batches a full run, which it sorts
by length first), each round running every method on the same examples with the order
rotated from round to round, because a shared machine drifts.

    python bench/hellaswag_throughput.py                       # both shapes, a few minutes on 2 cores
    python bench/hellaswag_throughput.py --shapes demo --examples 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanogpt_core.eval.examples import EvalData, read_examples_file  # noqa: E402
from nanogpt_core.eval.scoring import (DEFAULT_BATCH_SIZE, ExampleScore, render_example,  # noqa: E402
                                       score_example_unbatched, score_rendered)
from machine import cpu_model  # noqa: E402
from nanogpt_core.model import GPT, GPTConfig  # noqa: E402
from nanogpt_core.tokenizer import get_tokenizer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val_1000.jsonl"


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    examples: int  # timed examples (the same ones for every method)


SHAPES = {
    "gpt2-124m": Shape(n_layer=12, n_head=12, n_embd=768, block_size=1024, examples=32),
    "demo": Shape(n_layer=4, n_head=4, n_embd=256, block_size=256, examples=128),
}


def load_examples(path: str | None) -> EvalData:
    if path is None and DEFAULT_DATA.is_file():
        path = str(DEFAULT_DATA)
    if path is not None:
        return read_examples_file(path)
    from nanogpt_core.eval.cloze import demo_cloze_data
    return demo_cloze_data()  # no HellaSwag file here: time the offline set instead


def measure(shape_name: str, shape: Shape, data: EvalData, n_examples: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=shape.block_size, n_layer=shape.n_layer, n_head=shape.n_head,
                          n_embd=shape.n_embd)).eval()
    encoder = get_tokenizer()
    rendered = [render_example(ex, encoder, shape.block_size) for ex in data.examples[:n_examples]]
    # The scorer sorts a whole run's examples by length before it cuts batches, so a batch
    # holds examples of similar length; the rounds below are cut the same way.
    rendered.sort(key=lambda r: r.packed_length)
    methods = {
        "one example per pass (build-nanogpt)": lambda chunk: [score_example_unbatched(model, r) for r in chunk],
        "packed, 1 example per pass": lambda chunk: score_rendered(model, chunk, batch_size=1),
        f"packed, {batch_size} examples per pass": lambda chunk: score_rendered(model, chunk, batch_size=batch_size),
    }
    names = list(methods)
    for name in names:  # warm-up: first calls allocate and pick kernels
        methods[name](rendered[:2])
    seconds = dict.fromkeys(names, 0.0)
    scores: dict[str, list[ExampleScore]] = {name: [] for name in names}
    for round_index, start in enumerate(range(0, len(rendered), batch_size)):
        chunk = rendered[start:start + batch_size]
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            began = time.perf_counter()
            scores[name].extend(methods[name](chunk))
            seconds[name] += time.perf_counter() - began
    reference = scores[names[0]]
    worst = 0.0
    for name in names[1:]:
        for got, want in zip(scores[name], reference):
            if (got.pred, got.pred_norm, got.pred_char_norm) != (want.pred, want.pred_norm, want.pred_char_norm):
                raise AssertionError(f"{shape_name}: {name} picks differently from the baseline")
            worst = max(worst, max(abs(a - b) / abs(b) for a, b in zip(got.losses, want.losses)))
    if worst > 1e-5:
        raise AssertionError(f"{shape_name}: summed losses differ by {worst:.2e} (relative) from the baseline")
    base_rate = len(rendered) / seconds[names[0]]
    return {"shape": shape_name, "examples": len(rendered), "max_rel_loss_diff": worst,
            "methods": [{"method": name, "seconds": seconds[name], "examples_per_s": len(rendered) / seconds[name],
                         "speedup": len(rendered) / seconds[name] / base_rate} for name in names]}


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"CPU: {m['cpu']} | torch threads: {m['threads']} | torch {m['torch']} | python {m['python']} | "
          f"load average at start: {m['load_average']}")
    print(f"data: {report['data']} ({report['benchmark']})")
    header = f"{'shape':<10} {'examples':>8}  {'method':<38} {'seconds':>8} {'examples/s':>11} {'vs baseline':>12}"
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        for r in row["methods"]:
            print(f"{row['shape']:<10} {row['examples']:>8}  {r['method']:<38} {r['seconds']:>8.2f} "
                  f"{r['examples_per_s']:>11.2f} {r['speedup']:>11.2f}x")
    print("same picks (acc, acc_norm, acc_char_norm) on every example; largest relative difference in summed "
          "loss: " + ", ".join(f"{row['shape']} {row['max_rel_loss_diff']:.1e}" for row in report["results"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--examples", type=int, default=None, help="timed examples per shape (default: per shape)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--data", default=None, help=f"JSON-lines file (default: {DEFAULT_DATA} when present)")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    data = load_examples(args.data)
    report = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())},
        "data": data.source, "benchmark": data.benchmark, "batch_size": args.batch_size,
        "results": [measure(name, SHAPES[name], data, args.examples or SHAPES[name].examples, args.batch_size)
                    for name in args.shapes],
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
