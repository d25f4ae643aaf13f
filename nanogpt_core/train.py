"""Pretrain GPT-2 on token shards; meant to be launched by torchrun.

    torchrun --standalone --nproc_per_node=2 -m nanogpt_core.train --profile micro \\
        --data DATA_DIR --out RUN_DIR [--resume] [--max-steps N] [--checkpoint-every N] [--seed N]

Every field of the profile can be overridden (`--help` lists them). With `--resume` the run
continues from the newest complete checkpoint in RUN_DIR and, given the same number of
processes and the same settings, reproduces the uninterrupted run bit for bit: the
checkpoint holds the weights, the optimizer, the loader position and every rank's RNG.
The loop itself, `run_training`, is shared with fine-tuning (nanogpt_core.finetune).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt_core.atomic_file import write_text_atomically
from nanogpt_core.checkpoint import (CheckpointError, checkpoint_name, config_differences, latest_checkpoint,
                                     load_model_weights, prune_checkpoints, save_checkpoint)
from nanogpt_core.config import (EXECUTION_FIELDS, TrainConfig, add_config_arguments, add_profile_argument,
                                 config_from_args)
from nanogpt_core.content_hash import tensors_version
from nanogpt_core.distributed import (DistContext, gather_to_all, mean_across_ranks, peer_failures_named,
                                      setup_distributed, teardown_distributed)
from nanogpt_core.durations import format_duration
from nanogpt_core.hardware import peak_flops
from nanogpt_core.lineage import code_version, git_commit
from nanogpt_core.model import GPT
from nanogpt_core.run_command import run_training_entrypoint
from nanogpt_core.rng import capture_rng_state, restore_rng_state
from nanogpt_core.schedule import cosine_lr
from nanogpt_core.shards import ShardError, ShardLoader

METRICS_FILE = "metrics.jsonl"


class TrainingObserver(Protocol):
    """Receives progress on the main rank (the pipeline forwards it to Dagster)."""

    def on_step(self, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, path: Path, step: int) -> None: ...


@dataclass
class TrainResult:
    out_dir: Path
    metrics_path: Path
    checkpoints: list[Path] = field(default_factory=list)
    final_checkpoint: Path | None = None
    final_val_loss: float | None = None
    initial_val_loss: float | None = None
    final_train_loss: float | None = None
    tokens_seen: int = 0
    resumed_from: Path | None = None
    wall_seconds: float = 0.0
    lineage: dict[str, Any] = field(default_factory=dict)


def configure_backend(cfg: TrainConfig, ctx: DistContext) -> None:
    if ctx.device_type == "cuda":
        # TF32 matmuls for the fp32 parts; the bulk of the work runs under bf16 autocast.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        cores = os.cpu_count() or 1
        torch.set_num_threads(cfg.threads or max(1, cores // ctx.local_world_size))


def autocast_context(ctx: DistContext, mode: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on a CPU only when asked for ("auto" keeps fp32, the faster path there)."""
    if mode == "bf16" or (mode == "auto" and ctx.device_type == "cuda"):
        return torch.autocast(device_type=ctx.device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_val_loss(model: torch.nn.Module, loader: BatchSource, steps: int, ctx: DistContext,
                      autocast: str = "auto") -> float:
    """Mean loss over the first `steps` validation batches, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=ctx.device)
    for _ in range(steps):
        x, y = (t.to(ctx.device) for t in loader.next_batch())
        with autocast_context(ctx, autocast):
            _, loss = model(x, y, return_logits=False)
        total += loss.float() / steps
    model.train()
    return mean_across_ranks(total, ctx).item()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all ranks exactly when DDP kept them in sync."""
    return tensors_version(model.state_dict())


class MetricsLog:
    """The per-step JSON-lines file; on resume it drops lines past the checkpoint so the file
    reads exactly as an uninterrupted run's would."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step]
            write_text_atomically(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressDisplay:
    """A progress bar on a terminal (or anywhere, with NANOGPT_PROGRESS_BAR=1); a plain line per step
    otherwise (logs, Dagster). Both show the time left: the median of the last steps' measured
    times (so one slow validation step does not swing it) times the steps to go."""

    RECENT_STEPS = 20

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        self.enabled = enabled
        self.total = total
        self.step_seconds: list[float] = []
        if enabled and (sys.stderr.isatty() or os.environ.get("NANOGPT_PROGRESS_BAR") == "1"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def eta_seconds(self, step: int) -> float:
        recent = sorted(self.step_seconds[-self.RECENT_STEPS:])
        return recent[len(recent) // 2] * (self.total - step - 1) if recent else 0.0

    def update(self, m: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.step_seconds.append(m["dt_ms"] / 1000)
        eta = format_duration(self.eta_seconds(m["step"]))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {m['loss']:.4f}, {m['dt_ms'] / 1000:.2f} s/step, eta {eta}", refresh=False)
            self.bar.update(1)
        else:
            val = f" | val {m['val_loss']:.4f}" if "val_loss" in m else ""
            print(f"step {m['step']:5d}/{self.total} | loss {m['loss']:.6f}{val} | lr {m['lr']:.4e} | "
                  f"norm {m['grad_norm']:.4f} | {m['dt_ms']:.0f} ms | {m['tokens_per_sec']:.0f} tok/s | "
                  f"mfu {m['mfu'] * 100:.1f}% | eta {eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BatchSource(Protocol):
    """What the loop reads batches from: shards for pretraining, instruction examples for fine-tuning.

    Its state must be the same on every rank, so one saved state restores all of them.
    """

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class LoopPlan:
    """The optimisation loop's settings; pretraining and fine-tuning each derive one from their config."""

    max_steps: int
    grad_accum: int
    grad_clip: float
    lr_at: Callable[[int], float]
    val_every: int
    val_steps: int
    checkpoint_every: int
    keep_last: int
    seq_len: int  # for the FLOPs estimate behind MFU
    compile: bool = False
    autocast: str = "auto"  # see TrainConfig.autocast
    # extra per-step fields for metrics.jsonl, e.g. the fine-tuning epoch
    progress: Callable[[], dict[str, Any]] | None = None


def train(cfg: TrainConfig, out_dir: str | Path, data_dir: str | Path, *, resume: bool = False,
          observer: TrainingObserver | None = None, allow_changed_config: bool = False) -> TrainResult:
    """Run (or resume) a pretraining run; every rank calls this, rank 0 writes the files.

    A resume whose data version or training config differs from the checkpoint's is refused
    unless `allow_changed_config` (see `check_resume_matches`).
    """
    return run_in_process_group(
        cfg.device, cfg.process_group_timeout_s,
        lambda ctx: _train(cfg, Path(out_dir), Path(data_dir), resume, observer, ctx, allow_changed_config))


def run_in_process_group(device: str, timeout_s: float, body: Callable[[DistContext], TrainResult]) -> TrainResult:
    """`body(ctx)` between setting up the process group and tearing it down, timed.

    A rank that fails names its peers' failures, and the group is torn down on the way out
    either way, so that the other ranks are not left waiting on a collective.
    """
    started = time.perf_counter()
    ctx = setup_distributed(device, timeout_s)
    try:
        with peer_failures_named(ctx):
            result = body(ctx)
    except BaseException:
        teardown_distributed(after_error=True)
        raise
    teardown_distributed()
    result.wall_seconds = time.perf_counter() - started
    return result


def _train(cfg: TrainConfig, out_dir: Path, data_dir: Path, resume: bool, observer: TrainingObserver | None,
           ctx: DistContext, allow_changed_config: bool) -> TrainResult:
    configure_backend(cfg, ctx)
    grad_accum = cfg.grad_accum_steps(ctx.world_size)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Every rank seeds identically, so every rank builds identical initial weights.
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config()).to(ctx.device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.max_lr, ctx.device_type, muon_lr=cfg.muon_lr)
    train_loader = ShardLoader(data_dir, "train", cfg.micro_batch_size, cfg.seq_len, ctx.rank, ctx.world_size,
                               cfg.vocab_size)
    # A small corpus's held-out split may not fill one training batch; validation then uses what there is.
    val_loader = ShardLoader(data_dir, "val", cfg.micro_batch_size, cfg.seq_len, ctx.rank, ctx.world_size,
                             cfg.vocab_size, shrink_to_fit=True)
    if (val_loader.B, val_loader.T) != (cfg.micro_batch_size, cfg.seq_len) and ctx.is_main:
        print(f"warning: the val split of {data_dir} holds {train_loader.manifest.tokens.get('val')} tokens, less "
              f"than one batch of {cfg.micro_batch_size} x {cfg.seq_len} per process; validation uses "
              f"{val_loader.B} x {val_loader.T} instead, so its loss is noisy (rebuild the shards with a larger "
              f"--val-fraction for a steadier one)", file=sys.stderr, flush=True)
    lineage = {
        "profile": cfg.profile,
        "data_dir": str(data_dir.resolve()),
        "data_version": train_loader.manifest.data_version,
        "data_source": train_loader.manifest.source,
        "code_version": code_version(),
        "git_commit": git_commit(),
        "parent_checkpoint": None,
        "world_size": ctx.world_size,
    }
    plan = LoopPlan(
        max_steps=cfg.max_steps, grad_accum=grad_accum, grad_clip=cfg.grad_clip,
        lr_at=functools.partial(cosine_lr, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                max_steps=cfg.max_steps),
        val_every=cfg.val_every, val_steps=cfg.val_steps, checkpoint_every=cfg.checkpoint_every,
        keep_last=cfg.keep_last, seq_len=cfg.seq_len, compile=cfg.compile, autocast=cfg.autocast)
    return run_training(model, optimizer, plan, train_loader, val_loader, ctx=ctx, out_dir=out_dir,
                        lineage=lineage, run_config=cfg.to_dict(), resume=resume, observer=observer,
                        execution_fields=EXECUTION_FIELDS, allow_changed_config=allow_changed_config)


def run_training(model: GPT, optimizer: torch.optim.Optimizer, plan: LoopPlan, train_loader: BatchSource,
                 val_loader: BatchSource | None, *, ctx: DistContext, out_dir: Path, lineage: dict[str, Any],
                 run_config: dict[str, Any], resume: bool = False,
                 observer: TrainingObserver | None = None, execution_fields: Collection[str] = (),
                 allow_changed_config: bool = False) -> TrainResult:
    """The optimisation loop shared by pretraining and fine-tuning, from resume to the last checkpoint.

    Every rank calls it with identical weights; rank 0 writes metrics.jsonl and the checkpoints.
    With `resume`, the newest complete checkpoint in `out_dir` replaces the weights, optimizer,
    loader position and RNG states first, so the run continues as if never interrupted. The
    checkpoint's data version and `run_config` must match this run's, `execution_fields`
    aside, unless `allow_changed_config`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lineage = dict(lineage)
    start_step, resumed_from, initial_val_loss, tokens_seen = 0, None, None, 0
    found = latest_checkpoint(out_dir, map_location=ctx.device, resumable=True) if resume else None
    if found is not None:
        resumed_from, payload = found
        load_model_weights(model, payload, resumed_from)
        check_resume_matches(payload, resumed_from, lineage, run_config, execution_fields, allow_changed_config,
                             warn=ctx.is_main)
        optimizer.load_state_dict(payload["optimizer"])
        train_loader.load_state_dict(payload["loader"])
        saved_world = len(payload["rng"])
        if saved_world != ctx.world_size and ctx.is_main:
            print(f"warning: {resumed_from} was written by {saved_world} processes and this run has "
                  f"{ctx.world_size}; training continues, but not bit for bit", file=sys.stderr)
        restore_rng_state(payload["rng"][ctx.rank if ctx.rank < saved_world else 0])
        start_step = payload["step"] + 1
        initial_val_loss = payload["metrics"].get("initial_val_loss")
        tokens_seen = payload["metrics"].get("tokens_seen", 0)
        saved_parent, parent = payload["lineage"].get("parent_checkpoint"), lineage.get("parent_checkpoint")
        if saved_parent != parent:  # the lineage would name a checkpoint these weights do not descend from
            raise CheckpointError(f"{resumed_from} descends from {saved_parent}, not {parent}: resume from the "
                                  f"same parent, or write the new run to another folder")
        lineage["resumed_from"] = str(resumed_from)
        if ctx.is_main:
            print(f"resuming from {resumed_from} at step {start_step}", flush=True)
    elif resume and ctx.is_main:
        print(f"no checkpoint in {out_dir}; starting from scratch", flush=True)

    run_model: torch.nn.Module = model
    if plan.compile:
        run_model = torch.compile(run_model)
    if ctx.is_distributed:
        run_model = DDP(run_model, device_ids=[ctx.local_rank] if ctx.device_type == "cuda" else None)

    max_steps = plan.max_steps
    metrics_path = out_dir / METRICS_FILE
    # A resumed run rewrites the log from its checkpoint on; resuming a finished run changes nothing.
    keep_through = None if resumed_from is None else (start_step - 1 if start_step < max_steps else max_steps)
    log = MetricsLog(metrics_path, keep_through) if ctx.is_main else None
    display = ProgressDisplay(ctx.is_main, max_steps, start_step)
    # All ranks measure together, so a CPU's peak is what one process gets while the others
    # run too (measured alone, it would overstate the share and MFU would pass 100%).
    if ctx.is_distributed:
        dist.barrier()
    peak = peak_flops(ctx.device_type)
    # The output layer runs only where a target is trained (fine-tuning skips prompt and padding
    # positions), so its FLOPs are counted per trained position, the rest per position.
    cfg_model = model.config
    output_layer_flops = 6 * cfg_model.vocab_size * cfg_model.n_embd
    body_flops = model.flops_per_token(plan.seq_len) - output_layer_flops
    result = TrainResult(out_dir=out_dir, metrics_path=metrics_path, resumed_from=resumed_from, lineage=lineage)
    loss_value = val_loss = None

    for step in range(start_step, max_steps):
        step_started = time.perf_counter()
        record: dict[str, Any] = {"step": step}
        if val_loader is not None and step % plan.val_every == 0:
            val_loss = evaluate_val_loss(run_model, val_loader, plan.val_steps, ctx, plan.autocast)
            record["val_loss"] = val_loss
            if step == 0:
                initial_val_loss = val_loss

        loss_accum = torch.zeros((), device=ctx.device)
        step_tokens = step_trained = 0
        for micro_step in range(plan.grad_accum):
            x, y = train_loader.next_batch()
            # Every rank's batch has the same shape, so the step's token count needs no communication.
            step_tokens += x.numel() * ctx.world_size
            # This rank's trained positions times the ranks: an estimate that needs no communication.
            step_trained += int((y != -1).sum()) * ctx.world_size
            x, y = x.to(ctx.device), y.to(ctx.device)
            # Gradients are averaged across ranks only on the last micro-step.
            sync = micro_step == plan.grad_accum - 1 or not ctx.is_distributed
            with (contextlib.nullcontext() if sync else run_model.no_sync()), autocast_context(ctx, plan.autocast):
                _, loss = run_model(x, y, return_logits=False)
                loss = loss / plan.grad_accum
            loss_accum += loss.detach()
            loss.backward()
        loss_value = mean_across_ranks(loss_accum, ctx).item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {step}")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip).item()
        lr = plan.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ctx.device_type == "cuda":
            torch.cuda.synchronize()
        tokens_seen += step_tokens

        dt = time.perf_counter() - step_started
        tokens_per_sec = step_tokens / dt
        record.update(loss=loss_value, lr=lr, grad_norm=grad_norm, dt_ms=dt * 1000, tokens_per_sec=tokens_per_sec,
                      mfu=((body_flops * step_tokens + output_layer_flops * step_trained) / dt
                           / (peak * ctx.world_size)) if peak else 0.0,
                      tokens_seen=tokens_seen)
        if plan.progress is not None:
            record.update(plan.progress())
        if log is not None:
            log.write(record)
            display.update(record)
            if observer is not None:
                observer.on_step(record)

        last_step = step == max_steps - 1
        if last_step and val_loader is not None:
            val_loss = evaluate_val_loss(run_model, val_loader, plan.val_steps, ctx, plan.autocast)
        if (step + 1) % plan.checkpoint_every == 0 or last_step:
            rng_states = gather_to_all(capture_rng_state(), ctx)  # a collective: every rank joins
            rank_fingerprints = gather_to_all(weights_fingerprint(model), ctx)
            if len(set(rank_fingerprints)) > 1:
                raise RuntimeError(f"ranks hold different weights after step {step}: {rank_fingerprints}")
            if ctx.is_main:
                path = save_checkpoint(
                    out_dir / checkpoint_name(step), model, step=step, optimizer=optimizer,
                    train_config=run_config, loader_state=train_loader.state_dict(), rng_states=rng_states,
                    lineage={**lineage, "tokens_seen": tokens_seen},
                    metrics={"train_loss": loss_value, "val_loss": val_loss, "initial_val_loss": initial_val_loss,
                             "tokens_seen": tokens_seen, "rank_weight_fingerprints": rank_fingerprints})
                prune_checkpoints(out_dir, plan.keep_last)
                result.final_checkpoint = path
                if observer is not None:
                    observer.on_checkpoint(path, step)
        if last_step and log is not None and val_loss is not None:
            log.write({"step": max_steps, "val_loss": val_loss})

    display.close()
    if log is not None:
        log.close()
    result.final_val_loss, result.initial_val_loss = val_loss, initial_val_loss
    result.final_train_loss, result.tokens_seen = loss_value, tokens_seen
    if result.final_checkpoint is None and ctx.is_main:
        found = latest_checkpoint(out_dir)  # the run was already complete
        result.final_checkpoint = found[0] if found else None
    return result


def check_resume_matches(payload: dict[str, Any], path: Path, lineage: dict[str, Any], run_config: dict[str, Any],
                         execution_fields: Collection[str], allow_changed: bool, warn: bool) -> None:
    """Refuse to resume a checkpoint made on other data or with another training config.

    Carrying on silently would splice two different runs together: a changed `max_steps`
    alone moves every later step's learning rate. Fields that only change how the run
    executes or reports (`execution_fields`) may differ. With `allow_changed`, the
    differences are printed and the run goes on.
    """
    saved_version, version = payload["lineage"].get("data_version"), lineage.get("data_version")
    problems = [] if saved_version == version else [f"data version: checkpoint {saved_version} vs run {version}"]
    problems += config_differences(payload["train_config"], run_config, ignore=execution_fields)
    if not problems:
        return
    listed = "; ".join(problems)
    if not allow_changed:
        raise CheckpointError(f"refusing to resume from {path}: this run differs from the one that wrote it "
                              f"({listed}). Resume with the checkpoint's settings, write the new run to another "
                              f"--out folder, or pass --allow-changed-config to continue anyway")
    if warn:
        print(f"warning: resuming from {path} with changes allowed ({listed}); the run is no longer the one "
              f"that wrote it", file=sys.stderr, flush=True)


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume and its override, shared by the train and finetune commands."""
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--allow-changed-config", action="store_true",
                        help="with --resume, continue even when the data version or the training config differs "
                             "from the checkpoint's (refused by default)")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_profile_argument(parser)
    parser.add_argument("--out", required=True, help="run folder: checkpoints and metrics.jsonl")
    parser.add_argument("--data", required=True, help="shard folder (python -m nanogpt_core.shards)")
    add_resume_arguments(parser)
    add_config_arguments(parser)
    return parser


@record
def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    run_training_entrypoint(
        lambda observer: train(config_from_args(args), args.out, args.data, resume=args.resume, observer=observer,
                               allow_changed_config=args.allow_changed_config),
        user_errors=(ShardError, CheckpointError, ValueError), stage="pretrain")


if __name__ == "__main__":
    main()
