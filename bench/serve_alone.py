"""Batch-1 decode rates with each contender alone in a fresh process, as a server runs it.

`serve_throughput.py` measures every method in one process, taking turns. There the serving
engine's thread runs right after the main thread has run other models, and its one-row products
come out slower: a decode step that takes about 22 ms in a process where nothing else touches
torch took about 27 ms after the main thread had run eight tokens of `GPT.generate` (2-vCPU
Xeon, AVX-512, 2 torch threads; the cause was not pinned down, and torch's thread settings did
not change it). A server's main thread runs only the event loop, so this script gives each
method a process of its own, alternating rounds, and reports medians. The engine runs three
ways, which differ only in the weight layout its single rows go through
(`serving.linear_layouts`; products of several rows always use oneDNN's batch layout):

    engine, single-row layouts timed per role   as the server runs it: the fastest layout for
                                                each role, timed when the model loads
    engine, plain weights for single rows       `F.linear` (MKL) on the model's own weights, the
                                                choice before per-role timing on most machines
    engine, batch layout for every product      oneDNN's batch layout for single rows too
    GPT.generate / transformers generate        the references, on the main thread

    python bench/serve_alone.py --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_model  # noqa: E402
from serve_throughput import (PROMPT_LEN, core_kv_cache_rate, engine_run, kv_bytes_per_step,  # noqa: E402
                              prompt_tokens, read_bandwidth, to_transformers, transformers_rate)

from nanogpt_core.model import GPT, GPTConfig  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.kv_decoder import BatchDecoder  # noqa: E402

# The engine's variants, by the single-row layouts they are built with (None: timed per role).
ENGINE_VARIANTS = {"engine, single-row layouts timed per role": None,
                   "engine, plain weights for single rows": "plain",
                   "engine, batch layout for every product": "onednn-batch"}
METHODS = (*ENGINE_VARIANTS, "GPT.generate", "transformers generate")


def measure(method: str, tokens: int) -> float:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    if method in ENGINE_VARIANTS:
        # Built in the engine's thread, as serving/deployments.py builds it.
        engine = Engine(functools.partial(BatchDecoder, model, max_batch=8, one_row=ENGINE_VARIANTS[method])).start()
        try:
            engine_run(engine, [prompt_tokens(PROMPT_LEN)], 4)  # warm-up
            rate, _ = engine_run(engine, [prompt_tokens(PROMPT_LEN)], tokens)
        finally:
            engine.stop()
        return rate
    if method == "GPT.generate":
        return core_kv_cache_rate(model, tokens)
    return transformers_rate(to_transformers(model), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps({"rate": measure(args.child, args.tokens)}))
        return

    # What a batch-1 step reads, as serve_throughput.py counts it: the decoder's weights and the
    # cache at the average context.
    config = GPTConfig()
    weight_bytes = BatchDecoder(GPT(config).eval(), max_batch=1).weight_bytes_per_step()
    step_bytes = weight_bytes + kv_bytes_per_step(config, PROMPT_LEN + args.tokens / 2)
    rates: dict[str, list[float]] = {m: [] for m in METHODS}
    bandwidth = 0.0
    for round_ in range(args.rounds):
        order = METHODS if round_ % 2 == 0 else tuple(reversed(METHODS))
        for method in order:
            out = subprocess.run([sys.executable, __file__, "--child", method, "--tokens", str(args.tokens),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            rates[method].append(json.loads(out.stdout.strip().splitlines()[-1])["rate"])
        bandwidth = max(bandwidth, read_bandwidth(weight_bytes))
        print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)

    bound = bandwidth / step_bytes
    reference = statistics.median(rates["transformers generate"])
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    print(f"gpt2-124m shape, random weights, greedy, {args.tokens} tokens after a {PROMPT_LEN}-token prompt; "
          f"each method alone in a fresh process, {args.rounds} rounds in alternating order, medians")
    print(f"bound: read bandwidth {bandwidth / 1e9:.1f} GB/s -> at most {bound:.1f} tokens/s at batch 1\n")
    print("| method | tok/s (median) | rounds | vs transformers | of bound |")
    print("| --- | ---: | --- | ---: | ---: |")
    for method in METHODS:
        median = statistics.median(rates[method])
        runs = ", ".join(f"{r:.1f}" for r in rates[method])
        print(f"| {method} | {median:.1f} | {runs} | {median / reference:.2f}x | {median / bound:.0%} |")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)
