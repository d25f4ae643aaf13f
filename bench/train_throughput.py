"""Training throughput on this machine: our GPT against a plain eager baseline.

One training step is forward + backward + AdamW step, in fp32. For each shape the two
models are timed in alternating rounds (the order flips every round) and the median step
time is reported, because a shared machine drifts. The machine's fp32 matmul peak is
measured in the same run, so the FLOP/s figures can be read as a fraction of what this
CPU actually delivers.

    python bench/train_throughput.py                      # both shapes, 3-5 minutes
    python bench/train_throughput.py --shapes demo --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_model  # noqa: E402
from nanogpt_core.model import GPT, GPTConfig  # noqa: E402

VOCAB_SIZE = 50304


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    batch: int
    rounds: int  # timed rounds per model; each round runs `steps` steps
    steps: int


SHAPES = {
    "demo": Shape(n_layer=4, n_head=4, n_embd=256, seq_len=256, batch=8, rounds=7, steps=2),
    "gpt2-124m": Shape(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch=2, rounds=5, steps=1),
}


# --- the baseline: a plain eager nanoGPT-style model, the obvious way -----------------

class BaselineBlock(nn.Module):

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.attn_out = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc_in = nn.Linear(n_embd, 4 * n_embd)
        self.fc_out = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x)), approximate="tanh"))


class BaselineGPT(nn.Module):

    def __init__(self, shape: Shape, vocab_size: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, shape.n_embd)
        self.pos_emb = nn.Embedding(shape.seq_len, shape.n_embd)
        self.blocks = nn.ModuleList([BaselineBlock(shape.n_embd, shape.n_head) for _ in range(shape.n_layer)])
        self.ln_f = nn.LayerNorm(shape.n_embd)
        self.lm_head = nn.Linear(shape.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def baseline_optimizer(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95), eps=1e-8)


# --- measurement ----------------------------------------------------------------------

def matmul_peak_gflops(sizes=(2048, 3072, 4096), repeats: int = 4) -> float:
    """Best fp32 GFLOP/s of large square matmuls: what this CPU can do at best."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_token(shape: Shape, n_params: int) -> int:
    """6N + 12·L·C·T (PaLM appendix B); N excludes position embeddings, counts the tied head once."""
    return 6 * n_params + 12 * shape.n_layer * shape.n_embd * shape.seq_len


class Trainee:
    """A model, its optimizer and one fixed batch; `run` times whole training steps."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, step_fn, shape: Shape):
        self.name, self.model, self.optimizer, self.step_fn = name, model, optimizer, step_fn
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, VOCAB_SIZE, (shape.batch, shape.seq_len), generator=g)
        self.y = torch.randint(0, VOCAB_SIZE, (shape.batch, shape.seq_len), generator=g)
        self.step_times: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.step_fn(self.model, self.x, self.y)
            loss.backward()
            self.optimizer.step()
            elapsed = time.perf_counter() - start
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{self.name}: loss is {loss.item()}")
            if record:
                self.step_times.append(elapsed)


def build_trainees(shape: Shape) -> list[Trainee]:
    torch.manual_seed(0)
    baseline = BaselineGPT(shape, VOCAB_SIZE)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=shape.seq_len, vocab_size=VOCAB_SIZE, n_layer=shape.n_layer,
                         n_head=shape.n_head, n_embd=shape.n_embd, dropout=0.0))
    return [
        Trainee("baseline", baseline, baseline_optimizer(baseline), lambda m, x, y: m(x, y), shape),
        Trainee("ours", ours, ours.configure_optimizer(0.1, 6e-4, "cpu"),
                lambda m, x, y: m(x, y, return_logits=False)[1], shape),
    ]


def measure_shape(name: str, shape: Shape, warmup: int) -> dict:
    trainees = build_trainees(shape)
    n_params = trainees[1].model.num_params(exclude_position_embeddings=True)
    for t in trainees:
        t.run(warmup, record=False)
    for r in range(shape.rounds):
        for t in (trainees if r % 2 == 0 else trainees[::-1]):
            t.run(shape.steps)
    tokens = shape.batch * shape.seq_len
    fpt = flops_per_token(shape, n_params)
    result = {"shape": name, **asdict(shape), "params": n_params, "flops_per_token": fpt, "models": {}}
    for t in trainees:
        step_s = statistics.median(t.step_times)
        gflops = fpt * tokens / step_s / 1e9
        result["models"][t.name] = {
            "step_s": step_s, "best_step_s": min(t.step_times), "tokens_per_s": tokens / step_s,
            "gflops": gflops, "step_times": t.step_times,
        }
    result["speedup"] = result["models"]["ours"]["tokens_per_s"] / result["models"]["baseline"]["tokens_per_s"]
    return result


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"CPU: {m['cpu']}, {m['cores']} cores | torch {m['torch']}, {m['threads']} threads | "
          f"allocator: {m['malloc_env'] or 'glibc defaults'}")
    print(f"fp32 matmul peak (best square torch.mm, {m['threads']} threads): {report['peak_gflops']:.1f} GFLOP/s")
    header = (f"{'shape':<10} {'B x T':>9} {'model':<9} {'step s':>7} {'best s':>7} {'tokens/s':>9} "
              f"{'GFLOP/s':>8} {'of peak':>8} {'ours/base':>9}")
    print(header)
    print("-" * len(header))
    for r in report["shapes"]:
        for model_name, s in r["models"].items():
            ratio = f"{r['speedup']:.2f}x" if model_name == "ours" else ""
            print(f"{r['shape']:<10} {r['batch']:>4}x{r['seq_len']:<4} {model_name:<9} {s['step_s']:>7.3f} "
                  f"{s['best_step_s']:>7.3f} {s['tokens_per_s']:>9.0f} {s['gflops']:>8.1f} "
                  f"{s['peak_fraction']:>8.1%} {ratio:>9}")
    print("step s: median over alternating rounds (best s: fastest step); tokens/s, GFLOP/s and ratio from the"
          " median;\nFLOPs per token = 6N + 12·L·C·T (N: parameters without position embeddings, tied head once);"
          " warm-up excluded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="timed rounds per model (default: per shape)")
    parser.add_argument("--steps", type=int, help="steps per round (default: per shape)")
    parser.add_argument("--batch", type=int, help="micro-batch size (default: per shape)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # glibc's allocator settings change how often large tensors are paged in afresh, which
    # moves these numbers by 10-30%: record them with the results.
    malloc_env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "malloc_env": malloc_env},
        "shapes": [],
    }
    peak = matmul_peak_gflops()
    overrides = {k: v for k, v in (("rounds", args.rounds), ("steps", args.steps), ("batch", args.batch)) if v}
    for name in args.shapes.split(","):
        shape = Shape(**{**asdict(SHAPES[name]), **overrides})
        report["shapes"].append(measure_shape(name, shape, args.warmup))
    # The peak once more at the end, and the better of the two, so a machine that got faster
    # meanwhile cannot inflate the fractions.
    report["peak_gflops"] = max(peak, matmul_peak_gflops())
    for r in report["shapes"]:
        for s in r["models"].values():
            s["peak_fraction"] = s["gflops"] / report["peak_gflops"]
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
