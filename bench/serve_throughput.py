"""Decode throughput of the serving engine on the gpt2-124m shape, against the usual alternatives.

    python bench/serve_throughput.py [--tokens 64] [--threads N] [--quality-checkpoint model.pt]

Random weights (throughput does not depend on what the weights are). In one run, with
the same weights and greedy decoding throughout:
  - recomputing the whole context for every token (nanoGPT's original sampler),
  - nanogpt_core's own KV cache (`GPT.generate`),
  - Hugging Face transformers `generate` with its KV cache,
  - the serving engine with one stream, and with 8 concurrent streams,
the engine with int8 weights (1 and 8 streams), and the engine's time to first token for a
256-token prompt. Prints a table.

Each method's rate is also given as a fraction of its weight-streaming bound: at batch 1 a
step reads every weight once, so it cannot beat (read bandwidth) / (bytes read per step).
The read bandwidth is measured in the same rounds as the methods, by reading a buffer as
large as the weights (for fp32 and for int8 separately, since a smaller buffer may sit
partly in the cache). Prefill is compute-bound instead: its FLOPs over the time to first
token are given as a fraction of the fp32 matmul rate measured in the same run.

With `--quality-checkpoint`, a trained checkpoint is scored on the FineWeb-Edu sample with
fp32 and int8 weights: perplexity, and how often int8's top-1 token matches fp32's.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_model  # noqa: E402
from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE, GPTConfig  # noqa: E402
from nanogpt_core.tokenizer import EOT_TOKEN  # noqa: E402
from serving.engine import Engine, Generation  # noqa: E402
from serving.kv_decoder import BatchDecoder  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402

PROMPT_LEN = 16
TTFT_PROMPT_LEN = 256
TRANSFORMERS_B1 = "transformers generate (KV cache)"
ENGINE_B1 = "serving engine, 1 stream"
INT8_B1 = "serving engine int8, 1 stream"
FINEWEB_EDU = Path(__file__).resolve().parent.parent.parent / "shared/data/fineweb_edu/fineweb_edu_sample_155.parquet"
FORCING_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def instruction_set() -> str:
    """What the kernels run on: torch's dispatch level, the CPU's own best, and any forcing variables."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    native = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "unknown"
    forced = [f"{name}={os.environ[name]}" for name in FORCING_VARIABLES if name in os.environ]
    return (f"torch kernels {torch.backends.cpu.get_cpu_capability()} (CPU has {native}"
            + (f"; forced with {' '.join(forced)})" if forced else ")"))


def read_bandwidth(nbytes: int, passes: int = 3) -> float:
    """Bytes/s of the best of a few full reads of a buffer of `nbytes`, with torch's threads.

    Two ways of reading, the best counts: a sum, and a dot product of the buffer with itself
    (each element read once). On a 2-vCPU Xeon the sum read 29 GB/s where the dot product and a
    one-row matrix product both read 32-33, so a sum alone put the bound too low.
    """
    buffer = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(passes):
        for read in (torch.sum, lambda b: torch.dot(b, b)):
            started = time.perf_counter()
            read(buffer)
            best = min(best, time.perf_counter() - started)
    return nbytes / best


def matmul_peak(passes: int = 3) -> float:
    """FLOP/s of fp32 matrix products the size of a 256-token prefill's, the best of a few."""
    best = 0.0
    for rows, inner, out in ((TTFT_PROMPT_LEN, 768, 3072), (TTFT_PROMPT_LEN, 3072, 768), (1024, 1024, 1024)):
        a, b = torch.randn(rows, inner), torch.randn(out, inner)
        torch.nn.functional.linear(a, b)
        for _ in range(passes):
            started = time.perf_counter()
            for _ in range(4):
                torch.nn.functional.linear(a, b)
            best = max(best, 4 * 2 * rows * inner * out / (time.perf_counter() - started))
    return best


def prefill_flops(config: GPTConfig, tokens: int) -> float:
    """FLOPs of prefilling `tokens` from an empty cache, the output layer at the last position only."""
    C, L = config.n_embd, config.n_layer
    linears = 2 * tokens * L * 12 * C * C  # q/k/v, projection and the two MLP matrices: 12 C^2 weights
    attention = 2 * L * 2 * C * tokens * (tokens + 1) / 2  # scores and weighted sum over the causal half
    return linears + attention + 2 * C * GPT2_VOCAB_SIZE


def kv_bytes_per_step(config: GPTConfig, positions: float, itemsize: int = 4) -> float:
    """Bytes of cached keys and values one stream's decode step reads at a context of `positions`."""
    return 2 * config.n_layer * positions * config.n_embd * itemsize


def prompt_tokens(length: int, offset: int = 0) -> list[int]:
    return [(1000 + 37 * (i + offset)) % GPT2_VOCAB_SIZE for i in range(length)]


# --- the alternatives ------------------------------------------------------------------------


@torch.inference_mode()
def recompute_rate(model: GPT, tokens: int) -> float:
    idx = torch.tensor([prompt_tokens(PROMPT_LEN)])
    started = time.perf_counter()
    for _ in range(tokens):
        logits, _ = model(idx)
        next_token = logits[:, -1, :GPT2_VOCAB_SIZE].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_token], dim=1)
    return tokens / (time.perf_counter() - started)


@torch.inference_mode()
def core_kv_cache_rate(model: GPT, tokens: int) -> float:
    idx = torch.tensor([prompt_tokens(PROMPT_LEN)])
    model.generate(idx, 2, temperature=0)  # warm-up
    started = time.perf_counter()
    model.generate(idx, tokens, temperature=0)
    return tokens / (time.perf_counter() - started)


def to_transformers(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5))
    ours = model.state_dict()
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    theirs = {}
    for name, tensor in ours.items():
        # Hugging Face's GPT-2 uses Conv1D layers, whose weights are stored (in, out).
        theirs[name] = tensor.t().contiguous() if name.endswith(transposed) else tensor
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    missing = [m for m in missing if not m.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.eval()
    with torch.inference_mode():
        idx = torch.tensor([prompt_tokens(PROMPT_LEN)])
        difference = (hf(idx).logits - model(idx)[0]).abs().max().item()
    if difference > 1e-3:
        raise RuntimeError(f"transformers model disagrees with ours by {difference}")
    return hf


@torch.inference_mode()
def transformers_rate(hf, tokens: int, batch: int = 1) -> float:
    idx = torch.tensor([prompt_tokens(PROMPT_LEN, offset=b) for b in range(batch)])
    kwargs = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=EOT_TOKEN)
    hf.generate(idx, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    started = time.perf_counter()
    out = hf.generate(idx, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == PROMPT_LEN + tokens
    return batch * tokens / elapsed


# --- the serving engine ------------------------------------------------------------------------


def count_prefilled_tokens(decoder: BatchDecoder) -> list[int]:
    """Record the length of every chunk the engine prefills from now on (to check what TTFT covers)."""
    chunks: list[int] = []
    prefill = decoder.prefill

    def counting_prefill(slot: int, tokens: list[int]) -> torch.Tensor:
        chunks.append(len(tokens))
        return prefill(slot, tokens)

    decoder.prefill = counting_prefill
    return chunks


def engine_run(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, list[float]]:
    """Aggregate decode tokens/s over concurrent streams, and each stream's time to first token."""
    params = SamplingParams(max_tokens=tokens, temperature=0, logit_bias=((EOT_TOKEN, -100.0),))

    async def main():
        generations = [Generation(p, params) for p in prompts]
        submitted = time.perf_counter()
        for generation in generations:
            engine.submit(generation)
        first: dict[int, float] = {}
        last = submitted

        async def drain(i: int, generation: Generation) -> None:
            nonlocal last
            async for _ in generation.stream():
                now = time.perf_counter()
                first.setdefault(i, now)
                last = max(last, now)

        await asyncio.gather(*(drain(i, g) for i, g in enumerate(generations)))
        produced = sum(g.completion_tokens for g in generations)
        # Decode rate: tokens after each stream's first, over the time since the first stream began.
        decode_tokens = produced - len(generations)
        span = last - min(first.values())
        rate = decode_tokens / span if decode_tokens else 0.0
        return rate, [first[i] - submitted for i in range(len(generations))]

    return asyncio.run(main())


@torch.inference_mode()
def fineweb_edu_windows(length: int, count: int) -> list[list[int]]:
    import pyarrow.parquet as pq

    from nanogpt_core.tokenizer import get_tokenizer

    if not FINEWEB_EDU.is_file():
        raise SystemExit(f"the FineWeb-Edu sample is not at {FINEWEB_EDU} (see shared/data/README.md)")
    enc = get_tokenizer()
    windows: list[list[int]] = []
    for text in pq.read_table(FINEWEB_EDU, columns=["text"]).column("text").to_pylist():
        tokens = [EOT_TOKEN, *enc.encode_ordinary(text)]
        for start in range(0, len(tokens) - length, length):
            windows.append(tokens[start:start + length + 1])
            if len(windows) == count:
                return windows
    return windows


@torch.inference_mode()
def int8_quality(checkpoint: Path, windows: int) -> dict[str, float]:
    """Teacher-forced perplexity of fp32 and int8 weights on FineWeb-Edu, and their top-1 agreement."""
    from nanogpt_core.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint, map_location="cpu")
    model.eval()
    length = model.config.block_size - 1
    texts = fineweb_edu_windows(length, windows)
    decoders = {w: BatchDecoder(model, max_batch=1, weights=w) for w in ("fp32", "int8")}
    nll = {w: 0.0 for w in decoders}
    agree = total = 0
    for window in texts:
        inputs, targets = window[:-1], torch.tensor(window[1:])
        top1 = {}
        for w, decoder in decoders.items():
            decoder.clear(decoder.staging_slot)
            logits = decoder.score(decoder.staging_slot, inputs).float()
            nll[w] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            top1[w] = logits.argmax(dim=-1)
        agree += int((top1["fp32"] == top1["int8"]).sum())
        total += len(inputs)
    return {"tokens": total, "windows": len(texts), "window": length,
            "ppl_fp32": math.exp(nll["fp32"] / total), "ppl_int8": math.exp(nll["int8"] / total),
            "top1_agreement": agree / total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per stream")
    parser.add_argument("--recompute-tokens", type=int, default=24, help="tokens for the slow recompute baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all methods; the best counts")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-recompute", action="store_true")
    parser.add_argument("--quality-checkpoint", type=Path,
                        help="a trained model_*.pt to score with fp32 and int8 weights on FineWeb-Edu")
    parser.add_argument("--quality-windows", type=int, default=64, help="FineWeb-Edu windows of block_size tokens")
    args = parser.parse_args(argv)
    if args.quality_checkpoint is not None and not args.quality_checkpoint.is_file():
        parser.error(f"--quality-checkpoint {args.quality_checkpoint} is not a file")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig()  # the gpt2-124m shape
    model = GPT(config).eval()

    hf = None
    hf_version = "not installed"
    if not args.skip_transformers:
        try:
            import transformers
        except ImportError:
            pass
        else:
            hf_version = transformers.__version__
            hf = to_transformers(model)

    max_len = PROMPT_LEN + args.tokens + TTFT_PROMPT_LEN + 32
    # Each decoder is built in its engine's thread, as the server builds it (see serving.engine.Engine).
    engines = {w: Engine(functools.partial(BatchDecoder, model, max_batch=args.streams, max_len=max_len, weights=w),
                         max_queue=args.streams * 2, name=w).start() for w in ("fp32", "int8")}
    weight_bytes = {w: e.decoder.weight_bytes_per_step() for w, e in engines.items()}
    # GPT.generate and transformers read the padded fp32 output layer; the difference is 0.1%.
    one_prompt = [prompt_tokens(PROMPT_LEN)]
    many_prompts = [prompt_tokens(PROMPT_LEN, offset=i) for i in range(args.streams)]
    # (method, streams, weight format, measure returning aggregate tokens/s, rounds it takes part in)
    methods = []
    if not args.skip_recompute:
        methods.append(("recompute full context per token (nanoGPT sampler)", 1, "fp32",
                        lambda: recompute_rate(model, args.recompute_tokens), 1))
    methods.append(("nanogpt_core GPT.generate (plain KV cache)", 1, "fp32",
                    lambda: core_kv_cache_rate(model, args.tokens), 99))
    if hf is not None:
        methods += [
            (TRANSFORMERS_B1, 1, "fp32", lambda: transformers_rate(hf, args.tokens), 99),
            (f"transformers generate, batch of {args.streams}", args.streams, "fp32",
             lambda: transformers_rate(hf, args.tokens, batch=args.streams), 99),
        ]
    for w, b1_name in (("fp32", ENGINE_B1), ("int8", INT8_B1)):
        engine = engines[w]
        methods += [
            (b1_name, 1, w, lambda engine=engine: engine_run(engine, one_prompt, args.tokens)[0], 99),
            (f"serving engine{' int8' if w == 'int8' else ''}, {args.streams} concurrent streams", args.streams, w,
             lambda engine=engine: engine_run(engine, many_prompts, args.tokens)[0], 99),
        ]
    best: dict[str, float] = {}
    bandwidth = {w: 0.0 for w in weight_bytes}
    peak = 0.0
    ttfts: dict[str, list[float]] = {w: [] for w in engines}
    prefill_alone: list[float] = []
    prefilled = {w: count_prefilled_tokens(e.decoder) for w, e in engines.items()}
    covered: dict[str, list[int]] = {w: [] for w in engines}
    try:
        for engine in engines.values():
            engine_run(engine, one_prompt, 4)  # warm-up
        # Rounds over all methods rather than one method at a time: on a shared machine the
        # neighbours' load then falls on every method alike, and the best round counts. The
        # bounds are measured inside the same rounds for the same reason.
        for round_ in range(args.repeats):
            print(f"round {round_ + 1} of {args.repeats} ...", file=sys.stderr, flush=True)
            for w, nbytes in weight_bytes.items():
                bandwidth[w] = max(bandwidth[w], read_bandwidth(nbytes))
            peak = max(peak, matmul_peak())
            for name, _, _, measure, rounds in methods:
                if round_ < rounds:
                    best[name] = max(best.get(name, 0.0), measure())
            for w, engine in engines.items():
                prompt = [prompt_tokens(TTFT_PROMPT_LEN, offset=round_)]
                prefilled[w].clear()
                ttfts[w].append(engine_run(engine, prompt, 1)[1][0])
                covered[w].append(sum(prefilled[w]))
            # The same prefill outside the engine: if the engine's TTFT were shorter than this,
            # it would not cover the whole prompt.
            decoder = engines["fp32"].decoder
            started = time.perf_counter()
            decoder.clear(decoder.staging_slot)
            decoder.prefill(decoder.staging_slot, prompt_tokens(TTFT_PROMPT_LEN, offset=round_))
            prefill_alone.append(time.perf_counter() - started)
            decoder.clear(decoder.staging_slot)
    finally:
        for engine in engines.values():
            engine.stop()
    quality = int8_quality(args.quality_checkpoint, args.quality_windows) if args.quality_checkpoint else None

    hf_rate = best.get(TRANSFORMERS_B1)
    average_context = PROMPT_LEN + args.tokens / 2

    def bound(weights: str, streams: int) -> float:
        """Aggregate tokens/s if a step took only the time to read its weights and caches once."""
        step_bytes = weight_bytes[weights] + streams * kv_bytes_per_step(config, average_context)
        return streams * bandwidth[weights] / step_bytes

    print()
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}, "
          f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"instruction set: {instruction_set()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {hf_version}")
    print(f"model: gpt2-124m shape (12 layers, 768 wide, 50304 vocab), random weights, greedy; "
          f"{args.tokens} tokens per stream after a {PROMPT_LEN}-token prompt "
          f"({args.recompute_tokens} for recompute); best of {args.repeats} rounds (recompute: 1)")
    for w in ("fp32", "int8"):
        print(f"bound, {w}: read bandwidth {bandwidth[w] / 1e9:.1f} GB/s over a {weight_bytes[w] / 1e6:.0f} MB "
              f"buffer; a batch-1 step reads {weight_bytes[w] / 1e6:.0f} MB of weights "
              f"+ {kv_bytes_per_step(config, average_context) / 1e6:.1f} MB of cache "
              f"-> at most {bound(w, 1):.1f} tokens/s")
    print()
    header = (f"| {'method':<55} | {'streams':>7} | {'tok/s per stream':>16} | {'aggregate tok/s':>15} "
              f"| {'vs transformers b1':>18} | {'of bound':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for method, streams, w, _, _ in methods:
        aggregate = best[method]
        ratio = f"{aggregate / hf_rate:.2f}x" if hf_rate else "-"
        fraction = f"{aggregate / bound(w, streams):.0%}"
        print(f"| {method:<55} | {streams:>7} | {aggregate / streams:>16.1f} | {aggregate:>15.1f} | {ratio:>18} "
              f"| {fraction:>8} |")
    print()
    flops = prefill_flops(config, TTFT_PROMPT_LEN)
    print(f"prefill bound: fp32 matmul peak measured {peak / 1e9:.0f} GFLOP/s; a {TTFT_PROMPT_LEN}-token prompt "
          f"is {flops / 1e9:.1f} GFLOP -> at least {flops / peak * 1000:.0f} ms")
    for w in ("fp32", "int8"):
        median = statistics.median(ttfts[w])
        print(f"time to first token, {TTFT_PROMPT_LEN}-token prompt, {w}: median {median * 1000:.0f} ms "
              f"(runs: {', '.join(f'{t * 1000:.0f}' for t in ttfts[w])} ms), "
              f"{flops / median / 1e9:.0f} GFLOP/s = {flops / median / peak:.0%} of the fp32 peak")
    print(f"tokens prefilled before the first token came out: {sorted(set(covered['fp32'] + covered['int8']))} "
          f"of {TTFT_PROMPT_LEN} (the whole prompt, in chunks of up to {engines['fp32'].prefill_chunk})")
    alone = statistics.median(prefill_alone)
    print(f"the same prefill called directly (fp32 decoder.prefill, no engine): median {alone * 1000:.0f} ms")
    single, multi, int8 = best[ENGINE_B1], best[methods[-3][0]], best[INT8_B1]
    if hf_rate:
        print(f"goal: engine batch 1 >= 1.5x transformers: {single / hf_rate:.2f}x "
              f"{'met' if single / hf_rate >= 1.5 else 'NOT met'}")
    print(f"goal: engine batch 1 >= 80% of its bound: {single / bound('fp32', 1):.0%} "
          f"{'met' if single / bound('fp32', 1) >= 0.8 else 'NOT met'}")
    print(f"goal: {args.streams} streams aggregate >= 3x engine batch 1: {multi / single:.2f}x "
          f"{'met' if multi / single >= 3 else 'NOT met'}")
    print(f"goal: int8 engine batch 1 >= 2x fp32 engine: {int8 / single:.2f}x "
          f"{'met' if int8 / single >= 2 else 'NOT met'}")
    if quality:
        change = quality["ppl_int8"] / quality["ppl_fp32"] - 1
        print()
        print(f"int8 quality, {args.quality_checkpoint}: FineWeb-Edu sample, {quality['windows']} windows of "
              f"{quality['window']} tokens ({quality['tokens']} predictions), teacher-forced")
        print("| perplexity fp32 | perplexity int8 | change | top-1 agreement with fp32 |")
        print(f"| {quality['ppl_fp32']:.3f} | {quality['ppl_int8']:.3f} | {change:+.2%} "
              f"| {quality['top1_agreement']:.2%} |")
        print(f"goal: int8 perplexity within 2% of fp32: {'met' if abs(change) <= 0.02 else 'NOT met'}")


if __name__ == "__main__":
    main()
