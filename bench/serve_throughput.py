"""Decode throughput of the serving engine on the gpt2-124m shape, against the usual alternatives.

    python bench/serve_throughput.py [--tokens 64] [--rounds 3] [--layout-variants] [--quality-checkpoint model.pt]
    python bench/serve_throughput.py --quality-only --quality-checkpoint model.pt

Random weights (throughput does not depend on what the weights are), greedy decoding throughout:
  - recomputing the whole context for every token (nanoGPT's original sampler),
  - nanogpt_core's own KV cache (`GPT.generate`),
  - Hugging Face transformers `generate` with its KV cache, alone and as a batch of 8,
  - the serving engine with one stream and with 8 concurrent streams, fp32 and int8 weights,
and the engine's time to first token for a 256-token prompt. Prints a table.

Each method runs alone in a fresh process of its own, as a server runs its engine: in one
process taking turns, every method came out 20-45% slower than alone, and by different
amounts (on a 2-vCPU Xeon the int8 engine ran 75 tok/s after other models had run in its
process and 134 alone), which skewed the ratios as well as the rates. Rounds visit the methods
in alternating order, so that a neighbour's load falls on all alike; the table gives medians.

Each method's rate is also given as a fraction of its weight-streaming bound: at batch 1 a
step reads every weight once, so it cannot beat (read bandwidth) / (bytes read per step).
The read bandwidth is measured before each round, by reading a buffer as large as the
weights (for fp32 and for int8 separately, since a smaller buffer may sit partly in the
cache); the bound takes the median of the rounds' readings, as the rates are medians.
Prefill is compute-bound instead: its FLOPs over the time to first token are given as a
fraction of the fp32 matmul rate, measured and taken the same way.

With `--layout-variants`, the fp32 engine also runs with every single-row product through one
fixed weight layout (`serving.linear_layouts`), beside the per-role choice the server makes.
With `--quality-checkpoint`, a trained checkpoint is scored on the FineWeb-Edu sample with
fp32 and int8 weights: perplexity, and how often int8's top-1 token matches fp32's.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_model  # noqa: E402
from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE, GPTConfig  # noqa: E402
from nanogpt_core.tokenizer import EOT_TOKEN  # noqa: E402
from serving.engine import Engine, Generation  # noqa: E402
from serving.kv_decoder import BatchDecoder  # noqa: E402
from serving.linear_layouts import multiply, one_row_candidates, onednn_available, prepare  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402

PROMPT_LEN = 16
TTFT_PROMPT_LEN = 256
RECOMPUTE = "recompute full context per token (nanoGPT sampler)"
GENERATE = "nanogpt_core GPT.generate (plain KV cache)"
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


def spread(readings: list[float], unit: float, digits: int = 1) -> str:
    return ", ".join(f"{r / unit:.{digits}f}" for r in readings)


def matmul_peak(passes: int = 3) -> float:
    """FLOP/s of fp32 matrix products the size of a 256-token prefill's, the best of a few.

    Every kernel and weight layout the engine can use counts (`serving.linear_layouts`): on a
    2-vCPU Zen 4 EPYC MKL's `F.linear` alone made 162 GFLOP/s where the engine's oneDNN
    products prefilled at 179, which put the prefill above "the peak".
    """
    best = 0.0
    for rows, inner, out in ((TTFT_PROMPT_LEN, 768, 3072), (TTFT_PROMPT_LEN, 3072, 768), (1024, 1024, 1024)):
        a, weight = torch.randn(rows, inner), torch.randn(out, inner)
        for layout in one_row_candidates(onednn_available(a.device, a.dtype)):
            prepared = prepare(layout, weight, batch_hint=8)
            multiply(layout, prepared, a, None)
            for _ in range(passes):
                started = time.perf_counter()
                for _ in range(4):
                    multiply(layout, prepared, a, None)
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


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "recompute", "generate", "transformers" or "engine"
    streams: int = 1
    weights: str = "fp32"  # which bound applies
    one_row: str | None = None  # engine: one fixed single-row layout, or None for the per-role choice
    first_rounds: int | None = None  # run only in this many rounds (None: in every round)

    @property
    def times_first_token(self) -> bool:
        return self.kind == "engine" and self.streams == 1 and self.one_row is None


def methods_to_run(args: argparse.Namespace, with_transformers: bool) -> list[Method]:
    methods = []
    if not args.skip_recompute:
        methods.append(Method(RECOMPUTE, "recompute", first_rounds=1))
    methods.append(Method(GENERATE, "generate"))
    if with_transformers:
        methods += [Method(TRANSFORMERS_B1, "transformers"),
                    Method(f"transformers generate, batch of {args.streams}", "transformers", streams=args.streams)]
    methods += [Method(ENGINE_B1, "engine"),
                Method(f"serving engine, {args.streams} concurrent streams", "engine", streams=args.streams)]
    if args.layout_variants:
        methods += [Method(f"serving engine, 1 stream, every single row {layout}", "engine", one_row=layout)
                    for layout in one_row_candidates(onednn_available(torch.device("cpu"), torch.float32))]
    methods += [Method(INT8_B1, "engine", weights="int8"),
                Method(f"serving engine int8, {args.streams} concurrent streams", "engine", streams=args.streams,
                       weights="int8")]
    return methods


@torch.inference_mode()
def measure_alone(method: Method, args: argparse.Namespace) -> dict:
    """One method's figures, measured in this process (a fresh one, started for it)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    prompts = [prompt_tokens(PROMPT_LEN, offset=i) for i in range(method.streams)]
    if method.kind == "recompute":
        return {"rate": recompute_rate(model, args.recompute_tokens)}
    if method.kind == "generate":
        return {"rate": core_kv_cache_rate(model, args.tokens)}
    if method.kind == "transformers":
        return {"rate": transformers_rate(to_transformers(model), args.tokens, batch=method.streams)}
    max_len = PROMPT_LEN + args.tokens + TTFT_PROMPT_LEN + 32
    # Built in the engine's thread, as the server builds it (see serving.engine.Engine).
    engine = Engine(functools.partial(BatchDecoder, model, max_batch=args.streams, max_len=max_len,
                                      weights=method.weights, one_row=method.one_row),
                    max_queue=4 * args.streams).start()  # one caller's share, a quarter, holds every stream
    try:
        engine_run(engine, prompts, 4)  # warm-up
        result = {"rate": engine_run(engine, prompts, args.tokens)[0],
                  "layouts": engine.decoder.one_row_layouts,
                  "layout_ms": {role: c.ms_per_matrix for role, c in engine.decoder.one_row_choices.items()}}
        if method.times_first_token:
            prefilled = count_prefilled_tokens(engine.decoder)
            engine_run(engine, [prompt_tokens(TTFT_PROMPT_LEN, offset=7)], 1)  # warm-up at the prompt's shapes
            prefilled.clear()
            result["ttft"] = engine_run(engine, [prompt_tokens(TTFT_PROMPT_LEN)], 1)[1][0]
            result["prefilled"] = sum(prefilled)
    finally:
        engine.stop()
    if method.times_first_token:
        # The same prefill outside the engine: were the engine's TTFT shorter than this, it
        # would not cover the whole prompt.
        decoder = engine.decoder
        decoder.clear(decoder.staging_slot)
        started = time.perf_counter()
        decoder.prefill(decoder.staging_slot, prompt_tokens(TTFT_PROMPT_LEN))
        result["prefill_direct"] = time.perf_counter() - started
    return result


def run_alone(method: Method, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method.name, "--tokens", str(args.tokens),
               "--recompute-tokens", str(args.recompute_tokens), "--threads", str(args.threads),
               "--streams", str(args.streams)]
    if args.layout_variants:
        command.append("--layout-variants")
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measuring {method.name!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_layout_choices(runs: list[dict]) -> None:
    """What the fp32 engine timed when it loaded, each round: ms per matrix of a one-row product
    through each layout, role by role, and the layout it chose (starred)."""
    print("single-row products as the fp32 engine timed them when it loaded, ms per matrix (chosen: *):")
    for i, run in enumerate(runs):
        cells = []
        for role, timings in run["layout_ms"].items():
            chosen = run["layouts"][role]
            cells.append(f"{role} " + " ".join(f"{layout}{'*' if layout == chosen else ''} {ms:.3f}"
                                               for layout, ms in timings.items()))
        print(f"  round {i + 1}: " + "; ".join(cells))


def kernel_ceiling(run: dict, n_layer: int) -> float:
    """Tokens/s of a batch-1 step that did nothing but its 49 one-row products, each through the
    fastest layout the engine timed for its role at load: what the weight-streaming kernels
    allow, whatever the rest of the step costs."""
    seconds = sum((1 if role == "lm_head" else n_layer) * min(timings.values()) / 1000
                  for role, timings in run["layout_ms"].items())
    return 1 / seconds


def print_int8_quality(quality: dict[str, float], checkpoint: Path) -> None:
    change = quality["ppl_int8"] / quality["ppl_fp32"] - 1
    print(f"int8 quality, {checkpoint}: FineWeb-Edu sample, {quality['windows']} windows of "
          f"{quality['window']} tokens ({quality['tokens']} predictions), teacher-forced")
    print("| perplexity fp32 | perplexity int8 | change | top-1 agreement with fp32 |")
    print(f"| {quality['ppl_fp32']:.3f} | {quality['ppl_int8']:.3f} | {change:+.2%} "
          f"| {quality['top1_agreement']:.2%} |")
    print(f"goal: int8 perplexity within 2% of fp32: {'met' if abs(change) <= 0.02 else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per stream")
    parser.add_argument("--recompute-tokens", type=int, default=24, help="tokens for the slow recompute baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all methods; medians count")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-recompute", action="store_true")
    parser.add_argument("--layout-variants", action="store_true",
                        help="also run the fp32 engine with each fixed single-row weight layout")
    parser.add_argument("--quality-checkpoint", type=Path,
                        help="a trained model_*.pt to score with fp32 and int8 weights on FineWeb-Edu")
    parser.add_argument("--quality-windows", type=int, default=64, help="FineWeb-Edu windows of block_size tokens")
    parser.add_argument("--quality-only", action="store_true", help="score --quality-checkpoint and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quality_checkpoint is not None and not args.quality_checkpoint.is_file():
        parser.error(f"--quality-checkpoint {args.quality_checkpoint} is not a file")
    if args.quality_only and args.quality_checkpoint is None:
        parser.error("--quality-only needs --quality-checkpoint")
    torch.set_num_threads(args.threads)
    if args.quality_only:
        print_int8_quality(int8_quality(args.quality_checkpoint, args.quality_windows), args.quality_checkpoint)
        return

    if args.child:  # a fresh process for one method: measure it and print the figures as JSON
        method = next(m for m in methods_to_run(args, with_transformers=True) if m.name == args.child)
        print(json.dumps(measure_alone(method, args)))
        return

    hf_version = "not installed"
    if not args.skip_transformers:
        try:
            import transformers
        except ImportError:
            pass
        else:
            hf_version = transformers.__version__
    methods = methods_to_run(args, with_transformers=hf_version != "not installed")

    config = GPTConfig()  # the gpt2-124m shape
    sizing_model = GPT(config).eval()
    # GPT.generate and transformers read the padded fp32 output layer; the difference is 0.1%.
    weight_bytes = {w: BatchDecoder(sizing_model, max_batch=1, max_len=8, weights=w, one_row="plain")
                    .weight_bytes_per_step() for w in ("fp32", "int8")}
    del sizing_model
    results: dict[str, list[dict]] = {m.name: [] for m in methods}
    # Each round's best reading; the bound uses their median, as the rates are medians. The best
    # reading of all would compare a quiet moment of the machine with its typical rates: on a
    # 2-vCPU EPYC one pass in eighteen read 45 GB/s where the others read 27-31.
    bandwidths: dict[str, list[float]] = {w: [] for w in weight_bytes}
    peaks: list[float] = []
    for round_ in range(args.rounds):
        print(f"round {round_ + 1} of {args.rounds} ...", file=sys.stderr, flush=True)
        for w, nbytes in weight_bytes.items():
            bandwidths[w].append(read_bandwidth(nbytes))
        peaks.append(matmul_peak())
        for method in (methods if round_ % 2 == 0 else list(reversed(methods))):
            if method.first_rounds is None or round_ < method.first_rounds:
                results[method.name].append(run_alone(method, args))
    bandwidth = {w: statistics.median(readings) for w, readings in bandwidths.items()}
    peak = statistics.median(peaks)
    quality = int8_quality(args.quality_checkpoint, args.quality_windows) if args.quality_checkpoint else None

    def median(name: str, key: str = "rate") -> float:
        return statistics.median(r[key] for r in results[name])

    hf_rate = median(TRANSFORMERS_B1) if results.get(TRANSFORMERS_B1) else None
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
          f"({args.recompute_tokens} for recompute); each method alone in a fresh process, "
          f"medians of {args.rounds} rounds (recompute: 1)")
    for w in ("fp32", "int8"):
        print(f"bound, {w}: read bandwidth {bandwidth[w] / 1e9:.1f} GB/s (rounds: {spread(bandwidths[w], 1e9)}) "
              f"over a {weight_bytes[w] / 1e6:.0f} MB buffer; a batch-1 step reads {weight_bytes[w] / 1e6:.0f} MB of weights "
              f"+ {kv_bytes_per_step(config, average_context) / 1e6:.1f} MB of cache "
              f"-> at most {bound(w, 1):.1f} tokens/s")
    print_layout_choices(results[ENGINE_B1])
    if all(run["layout_ms"] for run in results[ENGINE_B1]):
        ceiling = statistics.median(kernel_ceiling(run, config.n_layer) for run in results[ENGINE_B1])
        print(f"kernel ceiling, fp32 batch 1: the one-row products alone, each role through its fastest layout "
              f"as timed at load -> {ceiling:.1f} tokens/s = {ceiling / bound('fp32', 1):.0%} of the bound "
              f"(median of rounds)")
    print()
    header = (f"| {'method':<60} | {'streams':>7} | {'aggregate tok/s':>15} | {'rounds':>18} "
              f"| {'vs transformers b1':>18} | {'of bound':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for method in methods:
        aggregate = median(method.name)
        rounds = ", ".join(f"{r['rate']:.1f}" for r in results[method.name])
        ratio = f"{aggregate / hf_rate:.2f}x" if hf_rate else "-"
        fraction = f"{aggregate / bound(method.weights, method.streams):.0%}"
        print(f"| {method.name:<60} | {method.streams:>7} | {aggregate:>15.1f} | {rounds:>18} | {ratio:>18} "
              f"| {fraction:>8} |")
    print()
    flops = prefill_flops(config, TTFT_PROMPT_LEN)
    print(f"prefill bound: fp32 matmul peak measured {peak / 1e9:.0f} GFLOP/s (rounds: {spread(peaks, 1e9, 0)}); "
          f"a {TTFT_PROMPT_LEN}-token prompt is {flops / 1e9:.1f} GFLOP -> at least {flops / peak * 1000:.0f} ms")
    for name, w in ((ENGINE_B1, "fp32"), (INT8_B1, "int8")):
        ttft = median(name, "ttft")
        each = ", ".join(f"{r['ttft'] * 1000:.0f}" for r in results[name])
        print(f"time to first token, {TTFT_PROMPT_LEN}-token prompt, {w}: median {ttft * 1000:.0f} ms "
              f"(rounds: {each} ms), "
              f"{flops / ttft / 1e9:.0f} GFLOP/s = {flops / ttft / peak:.0%} of the fp32 peak")
    covered = sorted({r["prefilled"] for name in (ENGINE_B1, INT8_B1) for r in results[name]})
    print(f"tokens prefilled before the first token came out: {covered} of {TTFT_PROMPT_LEN}")
    print(f"the same prefill called directly (fp32 decoder.prefill, no engine): "
          f"median {median(ENGINE_B1, 'prefill_direct') * 1000:.0f} ms")
    single, int8 = median(ENGINE_B1), median(INT8_B1)
    multi = median(f"serving engine, {args.streams} concurrent streams")
    if hf_rate:
        print(f"goal: engine batch 1 >= 1.5x transformers: {single / hf_rate:.2f}x "
              f"{'met' if single / hf_rate >= 1.5 else 'NOT met'}")
    print(f"goal: engine batch 1 >= 80% of its bound: {single / bound('fp32', 1):.0%} "
          f"{'met' if single / bound('fp32', 1) >= 0.8 else 'NOT met'}")
    print(f"goal: {args.streams} streams aggregate >= 3x engine batch 1: {multi / single:.2f}x "
          f"{'met' if multi / single >= 3 else 'NOT met'}")
    print(f"goal: int8 engine batch 1 >= 2x fp32 engine: {int8 / single:.2f}x "
          f"{'met' if int8 / single >= 2 else 'NOT met'}")
    print(f"goal: prefill >= 80% of the fp32 peak: {flops / median(ENGINE_B1, 'ttft') / peak:.0%} "
          f"{'met' if flops / median(ENGINE_B1, 'ttft') / peak >= 0.8 else 'NOT met'}")
    if quality:
        print()
        print_int8_quality(quality, args.quality_checkpoint)


if __name__ == "__main__":
    main()
