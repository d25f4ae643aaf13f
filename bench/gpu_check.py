"""One command that runs the project's CUDA code paths on a GPU machine and measures them.

    python3 bench/gpu_check.py --prepare .gpu_check                      # where the tokenizer is at hand
    python3 bench/gpu_check.py --data .gpu_check --out OUT/gpu_check     # on the GPU machine

GPU machines are often bare and offline: torch, numpy and tiktoken, but no FastAPI, pydantic,
Dagster or datasets, and no way to download GPT-2's tokenizer. So `--prepare` gathers what the
check reads into one small folder (a few MB; `.gpu_check/` is git-ignored) to carry along: the
hash-verified tokenizer file, a shard folder of the offline demo corpus, and HellaSwag examples
(the shared validation sample when it is there, else the demo cloze set). The check imports
only torch, numpy, tiktoken and the project's own training, evaluation and serving code.

Each part runs in child processes with its own time limit, cut to what is left of the whole
check's budget (465 s on CUDA), so a crash or a hang costs that part's figures and no others:
  train        gpt2-124m at T=1024 through nanogpt_core.train under torchrun, one process per
               local GPU: bf16 autocast, TF32, torch.compile, fused AdamW, DDP, a checkpoint.
               Tokens/s and MFU are the medians of the timed steps (after the compile
               warm-up); MFU is against the card's data-sheet dense bf16 peak
               (nanogpt_core.hardware). Peak memory is torch.cuda.max_memory_allocated.
  distributed  from the same processes: backend (NCCL), its version, world size, an
               all-reduce that must add up, and its bus bandwidth when there are 2+ GPUs.
  engine       the serving engine (serving.engine, no HTTP) with the gpt2-124m shape and
               random weights: one stream and 8 concurrent streams, decode tokens/s and time
               to first token, best of a few rounds.
  hellaswag    the batched scorer (nanogpt_core.eval.hellaswag) on the carried examples with
               random weights: examples/s (the accuracy of random weights is noise).

Without CUDA the same parts run at the micro shape: torch.compile on the CPU, bf16 autocast on
the CPU, gloo between two processes, the engine and the scorer on the CPU. The test suite runs
it that way, so a mistake on a CUDA-only line has a chance to show before the first GPU run.

The report goes to OUT as gpu_check.json (every figure, or the error text of each part that
failed), gpu_check.md (a table, also printed) and gpu_check.log (the console). The exit status
is 1 if any part failed. When the compiled training run fails, training runs once more without
torch.compile (`train_eager`), so the rest of the training path is still measured.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
for _path in (str(PROJECT_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from nanogpt_core.atomic_file import write_bytes_atomically  # noqa: E402
from nanogpt_core.tokenizer import CACHE_DIR_ENV, RANKS_FILENAME  # noqa: E402

PREPARED_FILE = "prepared.json"
TOKENIZER_DIR = "cache"  # becomes NANOGPT_CACHE_DIR for every part
SHARDS_DIR = "shards"
REPORT_JSON = "gpu_check.json"
REPORT_MD = "gpu_check.md"
REPORT_LOG = "gpu_check.log"
PARTS = ("engine", "hellaswag", "train")  # run order: the quick parts first
# Report sections: train_eager exists only when the compiled run failed (see run_check).
SECTIONS = ("engine", "hellaswag", "train", "train_eager", "distributed")
SHARED_HELLASWAG = PROJECT_ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val_1000.jsonl"
# The demo corpus holds ~0.5 M tokens. Twice over with 30% held out gives ~0.7 M training and
# ~0.3 M validation tokens: one step of 8 GPUs x 32 x 1024 tokens fits either split.
CORPUS_REPEATS = 2
VAL_FRACTION = 0.3
ENGINE_PROMPT_TOKENS = 16
MIN_PART_S = 30.0  # below this a part could not even start torch and CUDA

_started = time.monotonic()


class Console:
    """Prints, and keeps a copy in the report folder: a remote run's console may come back cut short."""

    transcript = None

    @classmethod
    def keep_copy_in(cls, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cls.transcript = open(path, "w", buffering=1)

    @classmethod
    def say(cls, line: str) -> None:
        print(line, flush=True)
        if cls.transcript is not None:
            cls.transcript.write(line + "\n")


def log(message: str) -> None:
    Console.say(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _started:6.1f}s] {message}")


# ---------------------------------------------------------------------------------------------
# What runs where


@dataclass(frozen=True)
class Plan:
    """Everything a part needs, written to a file that every child process reads."""

    device: str  # cuda | cpu
    data_dir: str
    work_dir: str  # run folders and per-part results; deleted at the end
    profile: str  # gpt2-124m on CUDA, micro on the CPU
    nproc: int
    micro_batch: int
    grad_accum: int
    warmup_steps: int  # untimed: torch.compile runs in the first step
    timed_steps: int
    autocast: str
    compile: bool
    engine_tokens: int
    engine_streams: int
    engine_long_prompt: int
    engine_rounds: int
    hellaswag_examples: int
    hellaswag_batch: int
    timeouts: dict[str, float]  # per part, each cut to what is left of budget_s
    budget_s: float  # the whole check, from start to report

    @property
    def train_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    def model_config(self):
        from nanogpt_core.config import get_profile

        return get_profile(self.profile).model_config()


RESIZING_OPTIONS = ("nproc", "micro_batch", "timed_steps")


def make_plan(args: argparse.Namespace, device: str, work_dir: Path) -> Plan:
    if device == "cuda":
        defaults = dict(profile="gpt2-124m", nproc=torch.cuda.device_count(), micro_batch=32, grad_accum=2,
                        warmup_steps=5, timed_steps=25, autocast="auto", compile=True, engine_tokens=128,
                        engine_long_prompt=512, engine_rounds=3, hellaswag_examples=1000, hellaswag_batch=32,
                        timeouts={"train": 300.0, "train_eager": 120.0, "engine": 75.0, "hellaswag": 75.0},
                        budget_s=465.0)
    else:
        # bf16 on the CPU is not the trainer's default there; asking for it runs the GPU's path.
        defaults = dict(profile="micro", nproc=2, micro_batch=4, grad_accum=2, warmup_steps=2, timed_steps=3,
                        autocast="bf16", compile=True, engine_tokens=16, engine_long_prompt=40, engine_rounds=2,
                        hellaswag_examples=32, hellaswag_batch=16,
                        timeouts={"train": 240.0, "train_eager": 120.0, "engine": 90.0, "hellaswag": 90.0},
                        budget_s=600.0)
    chosen = {key: getattr(args, key) for key in RESIZING_OPTIONS if getattr(args, key) is not None}
    return Plan(device=device, data_dir=str(Path(args.data).resolve()), work_dir=str(work_dir),
                engine_streams=8, **{**defaults, **chosen})


# ---------------------------------------------------------------------------------------------
# --prepare: the folder to carry


def prepare(folder: Path, hellaswag_file: Path | None) -> dict[str, Any]:
    """Write the tokenizer, the shards and the examples into `folder`; prepared.json last."""
    from nanogpt_core.data.demo_corpus import iter_demo_documents
    from nanogpt_core.eval.cloze import demo_cloze_data
    from nanogpt_core.eval.examples import DEMO_CLOZE, write_examples
    from nanogpt_core.shards import build_shards
    from nanogpt_core.tokenizer import gpt2_ranks_path

    if hellaswag_file is not None and not hellaswag_file.is_file():
        raise SystemExit(f"error: --hellaswag {hellaswag_file}: no such file")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PREPARED_FILE).unlink(missing_ok=True)  # unfinished until rewritten
    log(f"tokenizer -> {folder / TOKENIZER_DIR / RANKS_FILENAME}")
    (folder / TOKENIZER_DIR).mkdir(exist_ok=True)
    write_bytes_atomically(folder / TOKENIZER_DIR / RANKS_FILENAME, gpt2_ranks_path().read_bytes())

    log(f"demo corpus x{CORPUS_REPEATS} -> {folder / SHARDS_DIR}")
    texts = (doc.text for _ in range(CORPUS_REPEATS) for doc in iter_demo_documents())
    manifest = build_shards(texts, folder / SHARDS_DIR, val_fraction=VAL_FRACTION,
                            source={"kind": "demo", "repeats": CORPUS_REPEATS})

    if hellaswag_file is None and SHARED_HELLASWAG.is_file():
        hellaswag_file = SHARED_HELLASWAG
    for stale in folder.glob("examples.jsonl*"):
        stale.unlink()
    if hellaswag_file is not None:
        examples = folder / ("examples.jsonl.gz" if hellaswag_file.name.endswith(".gz") else "examples.jsonl")
        log(f"examples {hellaswag_file} -> {examples}")
        write_bytes_atomically(examples, hellaswag_file.read_bytes())
        examples_source = str(hellaswag_file)
    else:
        examples = folder / "examples.jsonl"
        log(f"no HellaSwag file; demo-cloze examples -> {examples}")
        write_examples(examples, demo_cloze_data().examples, DEMO_CLOZE)
        examples_source = "demo-cloze"
    prepared = {"tokenizer": f"{TOKENIZER_DIR}/{RANKS_FILENAME}", "shards": SHARDS_DIR,
                "shard_tokens": manifest.tokens, "examples": examples.name, "examples_source": examples_source,
                "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())}
    write_bytes_atomically(folder / PREPARED_FILE, json.dumps(prepared, indent=2).encode())
    return prepared


def read_prepared(folder: Path) -> dict[str, Any]:
    path = folder / PREPARED_FILE
    if not path.is_file():
        raise SystemExit(f"error: {folder} is not a prepared check folder (no {PREPARED_FILE}); make one with "
                         f"`python bench/gpu_check.py --prepare {folder}` on a machine that has the tokenizer")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# The parts (each runs in a child process)


def part_train(plan: Plan) -> dict[str, Any]:
    """One torchrun worker: check the process group, then train through nanogpt_core.train."""
    from nanogpt_core.config import get_profile
    from nanogpt_core.distributed import setup_distributed
    from nanogpt_core.train import METRICS_FILE, autocast_context, train

    ctx = setup_distributed(plan.device)  # train() joins this same process group
    distributed = check_process_group(ctx) if ctx.is_distributed else {"backend": None}
    profile = get_profile(plan.profile)
    steps = plan.train_steps
    cfg = get_profile(
        plan.profile, device=plan.device, compile=plan.compile, autocast=plan.autocast,
        micro_batch_size=plan.micro_batch,
        total_batch_size=plan.micro_batch * profile.seq_len * ctx.world_size * plan.grad_accum,
        max_steps=steps, warmup_steps=min(profile.warmup_steps, steps), val_every=steps, val_steps=1,
        checkpoint_every=steps, keep_last=1)
    if ctx.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    run_dir = Path(plan.work_dir) / "train_run"
    result = train(cfg, run_dir, Path(plan.data_dir) / SHARDS_DIR)
    report: dict[str, Any] = {"rank": ctx.rank, "world_size": ctx.world_size, "distributed": distributed}
    if ctx.device_type == "cuda":
        report["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
    else:
        report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if ctx.is_main:
        report["training"] = summarize_steps(run_dir / METRICS_FILE, plan.warmup_steps)
        report["training"].update(
            profile=plan.profile, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum_steps(ctx.world_size), tokens_per_step=cfg.total_batch_size,
            compile=cfg.compile,
            autocast="bf16" if isinstance(autocast_context(ctx, cfg.autocast), torch.autocast) else "off",
            fused_adamw=optimizer_is_fused(ctx.device), final_val_loss=result.final_val_loss,
            checkpoint=bool(result.final_checkpoint), wall_s=result.wall_seconds)
    return report


def optimizer_is_fused(device: torch.device) -> bool:
    """Whether GPT.configure_optimizer picks the fused AdamW kernel on this device (asked of a tiny model)."""
    from nanogpt_core.model import GPT, GPTConfig

    tiny = GPT(GPTConfig(block_size=4, vocab_size=8, n_layer=1, n_head=1, n_embd=4)).to(device)
    return bool(tiny.configure_optimizer(0.0, 1e-3, device.type).defaults.get("fused"))


def check_process_group(ctx) -> dict[str, Any]:
    """An all-reduce whose sum is known, and its bus bandwidth when there is more than one rank."""
    import torch.distributed as dist

    ones = torch.full((1024,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(ones)
    expected = ctx.world_size * (ctx.world_size + 1) / 2
    if not bool((ones == expected).all()):
        raise RuntimeError(f"all_reduce summed to {ones[0].item()}, expected {expected}")
    info: dict[str, Any] = {"backend": dist.get_backend(), "world_size": ctx.world_size,
                            "local_world_size": ctx.local_world_size, "all_reduce_sum_ok": True,
                            "nccl_version": nccl_version() if ctx.device_type == "cuda" else None,
                            "all_reduce_bus_gb_s": None}
    if ctx.world_size > 1:
        size = (256 if ctx.device_type == "cuda" else 4) * 2**20
        tensor = torch.ones(size // 4, device=ctx.device)
        dist.all_reduce(tensor)  # warm-up: connections and buffers
        seconds = timed(lambda: dist.all_reduce(tensor), ctx.device_type, repeats=5)
        # The bus bandwidth convention of nccl-tests: comparable across world sizes.
        info["all_reduce_bus_gb_s"] = size * 2 * (ctx.world_size - 1) / ctx.world_size / seconds / 1e9
        info["all_reduce_mib"] = size / 2**20
    return info


def timed(fn: Callable[[], Any], device_type: str, repeats: int) -> float:
    """Mean seconds per call."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def summarize_steps(metrics_path: Path, warmup_steps: int) -> dict[str, Any]:
    """Medians over the steps after the warm-up, from the trainer's own metrics.jsonl."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    timed_steps = steps[warmup_steps:]
    if not timed_steps:
        raise RuntimeError(f"{metrics_path} holds {len(steps)} steps, none after the {warmup_steps} warm-up steps")
    mfu = [r["mfu"] for r in timed_steps]
    return {
        "steps": len(steps), "timed_steps": len(timed_steps),
        "first_step_s": steps[0]["dt_ms"] / 1000,  # compile, and the first validation pass
        "step_ms_median": statistics.median(r["dt_ms"] for r in timed_steps),
        "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in timed_steps),
        "tokens_per_s_best": max(r["tokens_per_sec"] for r in timed_steps),
        # The trainer writes 0 when the card's peak is unknown: no MFU rather than a false one.
        "mfu": statistics.median(mfu) if any(mfu) else None,
        "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
    }


def part_engine(plan: Plan) -> dict[str, Any]:
    from serve_throughput import engine_run, prompt_tokens

    from nanogpt_core.model import GPT
    from serving.engine import Engine
    from serving.kv_decoder import BatchDecoder

    torch.manual_seed(0)
    model = GPT(plan.model_config()).to(plan.device).eval()
    streams, tokens = plan.engine_streams, plan.engine_tokens
    max_len = min(model.config.block_size, max(ENGINE_PROMPT_TOKENS + tokens, plan.engine_long_prompt) + 8)
    # One caller sends every stream, and a caller may have a quarter of the queue waiting.
    engine = Engine(BatchDecoder(model, max_batch=streams, max_len=max_len), max_queue=4 * streams).start()
    one = [prompt_tokens(ENGINE_PROMPT_TOKENS)]
    many = [prompt_tokens(ENGINE_PROMPT_TOKENS, offset=i) for i in range(streams)]
    try:
        engine_run(engine, one, 4)  # warm-up: first kernels, allocator
        engine_run(engine, many, 4)
        single, several = [], []
        for round_ in range(plan.engine_rounds):
            log(f"engine round {round_ + 1} of {plan.engine_rounds}")
            single.append(engine_run(engine, one, tokens))
            several.append(engine_run(engine, many, tokens))
        long_ttft = [engine_run(engine, [prompt_tokens(plan.engine_long_prompt, offset=r)], 1)[1][0]
                     for r in range(3)]
    finally:
        engine.stop()
    best_single = max(single, key=lambda r: r[0])
    best_several = max(several, key=lambda r: r[0])
    return {
        "shape": plan.profile, "weights": f"random, {next(model.parameters()).dtype}".replace("torch.", ""),
        "prompt_tokens": ENGINE_PROMPT_TOKENS, "tokens_per_stream": tokens, "rounds": plan.engine_rounds,
        "streams_1_tokens_per_s": best_single[0],
        "streams_1_ttft_ms": statistics.median(r[1][0] for r in single) * 1000,
        "streams": streams,
        "streams_n_tokens_per_s": best_several[0],
        "streams_n_tokens_per_s_per_stream": best_several[0] / streams,
        "streams_n_ttft_ms_median": statistics.median(t for r in several for t in r[1]) * 1000,
        "streams_n_ttft_ms_max": max(t for r in several for t in r[1]) * 1000,
        "long_prompt_tokens": plan.engine_long_prompt,
        "long_prompt_ttft_ms": statistics.median(long_ttft) * 1000,
    }


def part_hellaswag(plan: Plan) -> dict[str, Any]:
    from nanogpt_core.eval.examples import read_examples_file
    from nanogpt_core.eval.scoring import evaluate_model
    from nanogpt_core.model import GPT

    prepared = read_prepared(Path(plan.data_dir))
    data = read_examples_file(Path(plan.data_dir) / prepared["examples"])
    torch.manual_seed(0)
    model = GPT(plan.model_config()).to(plan.device).eval()
    n = min(plan.hellaswag_examples, len(data.examples))
    warm = dataclasses.replace(data, examples=data.examples[-plan.hellaswag_batch:])
    evaluate_model(model, warm, batch_size=plan.hellaswag_batch, device=plan.device)
    began = time.perf_counter()
    report = evaluate_model(model, data, limit=n, batch_size=plan.hellaswag_batch, device=plan.device)
    seconds = time.perf_counter() - began
    return {"benchmark": data.benchmark, "source": prepared["examples_source"], "shape": plan.profile,
            "examples": n, "batch_size": plan.hellaswag_batch, "seconds": seconds, "examples_per_s": n / seconds,
            "timed": "end to end: tokenizing, packing and scoring",
            "acc_norm_random_weights": report["acc_norm"]}


PART_FUNCTIONS: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "train": part_train, "engine": part_engine, "hellaswag": part_hellaswag}


def run_part_here(name: str, plan_path: Path, result_path: Path) -> None:
    """A child's whole life: run one part, write its result (or its error) to a file."""
    plan = Plan(**json.loads(plan_path.read_text()))
    rank = os.environ.get("RANK")
    if rank is not None:
        result_path = result_path.with_name(f"{result_path.name}.rank{rank}")
    try:
        result = PART_FUNCTIONS[name](plan)
    except BaseException as exc:
        traceback.print_exc()
        write_bytes_atomically(result_path, json.dumps({"error": f"{type(exc).__name__}: {exc}",
                                                    "traceback": traceback.format_exc()}).encode())
        raise SystemExit(1) from None
    write_bytes_atomically(result_path, json.dumps(result).encode())


# ---------------------------------------------------------------------------------------------
# The parent: launch the parts, collect, report


def environment(device: str) -> dict[str, Any]:
    from machine import cpu_model

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "triton": _version_of("triton"), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "device": device,
        # what torch.compile needs besides torch: a C compiler, and Python's headers
        "c_compiler": shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc"),
        "python_headers": Path(sysconfig.get_paths()["include"], "Python.h").is_file()}
    if device == "cuda":
        try:
            info.update(cuda_environment())
        except Exception as exc:  # the parts still run; each reports what it finds
            info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return info


def cuda_environment() -> dict[str, Any]:
    from nanogpt_core.hardware import peak_flops

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    props = torch.cuda.get_device_properties(0)
    peak = peak_flops("cuda", names[0])
    return dict(gpu_count=len(names), gpus=names, card=names[0],
                gpu_memory_gib=props.total_memory / 2**30, compute_capability=f"{props.major}.{props.minor}",
                cudnn=torch.backends.cudnn.version(), nccl=nccl_version(),
                bf16_supported=torch.cuda.is_bf16_supported(),
                bf16_peak_tflops=peak / 1e12 if peak else None,
                peak_source="data sheet (nanogpt_core.hardware)" if peak else "unknown card")


def nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken on this machine: either way there is no version to report
        return None


@dataclass
class ChildOutcome:
    returncode: int | None
    timed_out: bool
    tail: list[str]


def run_child(name: str, command: list[str], timeout: float, env: dict[str, str]) -> ChildOutcome:
    """Run a child in its own process group, echoing its output; kill the group at the time limit."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=PROJECT_ROOT, start_new_session=True, errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def echo() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            Console.say(f"    {name} | {line.rstrip()}")

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"{name}: past its {timeout:.0f} s limit; stopping it")
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return ChildOutcome(proc.returncode, timed_out, list(tail))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def launch_part(name: str, plan: Plan, plan_path: Path, label: str | None = None) -> dict[str, Any]:
    """Run one part in children and return its section of the report (named `label`, default `name`)."""
    label = label or name
    timeout = min(plan.timeouts[label], plan.budget_s - (time.monotonic() - _started))
    if timeout < MIN_PART_S:
        log(f"{label}: skipped, the check's {plan.budget_s:.0f} s are spent")
        return {"ok": False, "seconds": 0.0, "timed_out": False,
                "error": f"skipped: {timeout:.0f} s were left of the check's {plan.budget_s:.0f} s budget"}
    result_path = Path(plan.work_dir) / f"{label}.result.json"
    script = str(Path(__file__).resolve())
    child_args = [script, "--part", name, "--plan", str(plan_path), "--result", str(result_path)]
    if name == "train":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={plan.nproc}", *child_args]
    else:
        command = [sys.executable, *child_args]
    env = {**os.environ, CACHE_DIR_ENV: str(Path(plan.data_dir) / TOKENIZER_DIR), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    log(f"{label}: starting (limit {timeout:.0f} s)")
    began = time.monotonic()
    outcome = run_child(label, command, timeout, env)
    seconds = time.monotonic() - began
    results = sorted(result_path.parent.glob(result_path.name + "*"))
    loaded = [json.loads(p.read_text()) for p in results]
    errors = [r for r in loaded if "error" in r]
    section: dict[str, Any] = {"ok": False, "seconds": seconds, "timed_out": outcome.timed_out}
    if outcome.timed_out:
        section["error"] = f"no result within its {timeout:.0f} s limit; last output: " + \
            " / ".join(outcome.tail[-8:])
    elif errors:
        section.update(error=errors[0]["error"], traceback=errors[0]["traceback"])
    elif outcome.returncode != 0 or not loaded:
        section["error"] = f"exited with status {outcome.returncode} and no result; last output: " + \
            " / ".join(outcome.tail[-12:])
    else:
        section.update(ok=True, **merge_results(name, loaded))
    log(f"{label}: {'done' if section['ok'] else 'FAILED: ' + section['error'][:300]} ({seconds:.0f} s)")
    return section


def merge_results(name: str, loaded: list[dict[str, Any]]) -> dict[str, Any]:
    if name != "train":
        return loaded[0]
    main = next(r for r in loaded if r["rank"] == 0)
    merged = dict(main["training"], world_size=main["world_size"], distributed=main["distributed"])
    if any("peak_memory_allocated_bytes" in r for r in loaded):
        merged["peak_memory_allocated_gib"] = max(r["peak_memory_allocated_bytes"] for r in loaded) / 2**30
    else:
        merged["peak_rss_mib"] = max(r["peak_rss_bytes"] for r in loaded) / 2**20
    return merged


def write_report(out: Path, report: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode())
    table = markdown(report)
    write_bytes_atomically(out / REPORT_MD, table.encode())
    return table


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    if env["device"] == "cuda" and "card" in env:
        peak = f"{env['bf16_peak_tflops']:g} TFLOP/s bf16" if env["bf16_peak_tflops"] else "unknown card"
        machine = (f"{env['gpu_count']} x {env['card']} ({env['gpu_memory_gib']:.0f} GiB, peak {peak}), "
                   f"CUDA {env['cuda_runtime']}, NCCL {env['nccl']}")
    elif env["device"] == "cuda":
        machine = f"CUDA, but its description failed: {env.get('cuda_error')}"
    else:
        machine = f"no CUDA: CPU run at the micro shape on {env['cpu']} ({env['cpu_count']} CPUs)"
    lines = [f"GPU check, {report['started']}: {machine}; torch {env['torch']}, Python {env['python']}", "",
             "| part | figure | value |", "|---|---|---|"]

    def row(part: str, figure: str, value: str) -> None:
        lines.append(f"| {part} | {figure} | {value} |")

    for part in SECTIONS:
        section = report.get(part)
        if section is None:
            continue
        if not section.get("ok"):
            row(part, "FAILED", section.get("error", "").replace("|", "/").replace("\n", " ")[:400])
            continue
        for figure, value in figures(part, section):
            row(part, figure, value)
    return "\n".join(lines) + "\n"


def figures(part: str, s: dict[str, Any]) -> list[tuple[str, str]]:
    if part in ("train", "train_eager"):
        memory = (f"{s['peak_memory_allocated_gib']:.1f} GiB allocated (max over ranks)"
                  if "peak_memory_allocated_gib" in s else f"{s['peak_rss_mib']:.0f} MiB RSS (max over ranks)")
        return [
            ("setup", f"{s['profile']}, {s['world_size']} process(es), {s['micro_batch']} x {s['seq_len']} x "
                      f"{s['grad_accum']} accum = {s['tokens_per_step']:,} tokens/step, "
                      f"{'torch.compile' if s['compile'] else 'eager (no torch.compile)'}, "
                      f"autocast {s['autocast']}, {'fused AdamW' if s['fused_adamw'] else 'AdamW, not fused'}"),
            ("tokens/s (all ranks, median)", f"{s['tokens_per_s']:,.0f} (best {s['tokens_per_s_best']:,.0f})"),
            ("step time (median)", f"{s['step_ms_median']:.1f} ms over {s['timed_steps']} steps"),
            ("MFU", f"{s['mfu'] * 100:.1f}%" if s["mfu"] is not None else "unknown card"),
            ("peak memory", memory),
            ("first step" + (" (compile)" if s["compile"] else ""), f"{s['first_step_s']:.1f} s"),
            ("loss first -> last", f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}"),
        ]
    if part == "distributed":
        bandwidth = (f"{s['all_reduce_bus_gb_s']:.1f} GB/s bus ({s['all_reduce_mib']:.0f} MiB)"
                     if s.get("all_reduce_bus_gb_s") else "- (one rank)")
        return [("backend", f"{s['backend']} {s.get('nccl_version') or ''}".strip()),
                ("world size", str(s["world_size"])), ("all-reduce", f"sum correct; {bandwidth}")]
    if part == "engine":
        n = s["streams"]
        return [
            ("1 stream", f"{s['streams_1_tokens_per_s']:,.1f} tokens/s, TTFT {s['streams_1_ttft_ms']:.1f} ms"),
            (f"{n} streams", f"{s['streams_n_tokens_per_s']:,.1f} tokens/s "
                             f"({s['streams_n_tokens_per_s_per_stream']:,.1f} per stream), "
                             f"TTFT median {s['streams_n_ttft_ms_median']:.1f} ms, "
                             f"max {s['streams_n_ttft_ms_max']:.1f} ms"),
            (f"TTFT, {s['long_prompt_tokens']}-token prompt", f"{s['long_prompt_ttft_ms']:.1f} ms"),
            ("setup", f"{s['shape']} shape, {s['weights']} weights, {s['prompt_tokens']}-token prompts, "
                      f"{s['tokens_per_stream']} tokens per stream, best of {s['rounds']} rounds"),
        ]
    if part == "hellaswag":
        return [("examples/s", f"{s['examples_per_s']:,.1f} ({s['examples']} examples, batch {s['batch_size']}, "
                               f"{s['shape']} shape, random weights)"),
                ("data", f"{s['benchmark']}: {s['source']}")]
    return []


def run_check(args: argparse.Namespace) -> int:
    data = Path(args.data).resolve()
    read_prepared(data)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if not args.out:
        raise SystemExit("error: --out is required: the folder for gpu_check.json, gpu_check.md and gpu_check.log")
    for key in RESIZING_OPTIONS:
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    out = Path(args.out)
    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"error: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    Console.keep_copy_in(out / REPORT_LOG)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
                              "environment": environment(device)}
    log(f"device {device}: {report['environment'].get('card') or report['environment']['cpu']}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        plan = make_plan(args, device, Path(work))
        report["plan"] = dataclasses.asdict(plan)
        plan_path = write_plan(plan, Path(work) / "plan.json")
        for part in (p for p in PARTS if p in parts):
            report[part] = launch_part(part, plan, plan_path)
            if part == "train" and not report["train"]["ok"] and plan.compile and not report["train"]["timed_out"]:
                # torch.compile needs a C compiler and Python's headers, which a bare machine may
                # lack: without it the rest of the training path (NCCL, bf16, fused AdamW,
                # checkpoint) still gets figures, and the compiled run still counts as failed.
                log("train: once more without torch.compile")
                eager = dataclasses.replace(plan, compile=False)
                report["train_eager"] = launch_part("train", eager, write_plan(eager, Path(work) / "plan_eager.json"),
                                                    label="train_eager")
            if part == "train":
                report["distributed"] = distributed_section(report)
            write_report(out, report)  # after every part, so a later hang loses nothing
    failed = [p for p in SECTIONS if p in report and not report[p]["ok"]]
    report.update(failed=failed, ok=not failed, wall_s=time.monotonic() - _started)
    table = write_report(out, report)
    Console.say("\n" + table)
    log(f"report: {out / REPORT_JSON}, {out / REPORT_MD}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def write_plan(plan: Plan, path: Path) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(plan)))
    return path


def distributed_section(report: dict[str, Any]) -> dict[str, Any]:
    """The process-group figures of the training run that got that far, with where they came from."""
    for source in ("train", "train_eager"):
        if report.get(source, {}).get("ok"):
            return {"ok": True, "from": source, **report[source]["distributed"]}
    return {"ok": False, "error": "no result: no training run got as far as reporting it"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", metavar="DIR", help="write the folder to carry to the GPU machine, then stop")
    parser.add_argument("--hellaswag", metavar="FILE", type=Path,
                        help=f"with --prepare: the examples to carry (default: {SHARED_HELLASWAG} when present, "
                             "else the demo cloze set)")
    parser.add_argument("--data", default=".gpu_check", help="the prepared folder (default: .gpu_check)")
    parser.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--nproc", type=int, help="training processes (default: every GPU; 2 on a CPU)")
    parser.add_argument("--micro-batch", type=int, help="sequences per process per micro-step (default: 32 on CUDA)")
    parser.add_argument("--timed-steps", type=int, help="training steps timed after the warm-up (default: 25 on CUDA)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child running one part
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.part:
        run_part_here(args.part, args.plan, args.result)
        return 0
    if args.prepare:
        prepared = prepare(Path(args.prepare), args.hellaswag)
        log(f"prepared {args.prepare}: {prepared['bytes'] / 2**20:.1f} MiB; carry it to the GPU machine and run "
            f"`python3 bench/gpu_check.py --data {args.prepare} --out OUT`")
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
