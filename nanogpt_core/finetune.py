"""Fine-tune a pretrained GPT-2 on instruction data; meant to be launched by torchrun.

    torchrun --standalone --nproc_per_node=2 -m nanogpt_core.finetune --profile micro \\
        --init CHECKPOINT_OR_RUN_DIR --out RUN_DIR [--data FILE_OR_PREPARED_DIR] [--resume]

`--init` is a checkpoint, or a run folder whose newest checkpoint is used. Instead of it,
`--init-from hf:DIR_OR_NAME` starts from a GPT-2 in Hugging Face format (a folder, or a hub
name such as `hf:gpt2` where the hub is reachable), imported into RUN_DIR/init first (see
nanogpt_core.hf). `--data` is a Dolly-style JSON-lines file (or folder of them), or a folder
prepared with `python -m nanogpt_core.data.instructions`; without it the profile's source is
used (micro and demo: the offline chatterbot conversations; gpt2-124m: databricks-dolly-15k).
Files are prepared into RUN_DIR/data first.

The loss covers response tokens only (see nanogpt_core.data.instructions). The run goes for
a number of epochs with its own warmup and cosine schedule, evaluates on the held-out split,
and writes checkpoints in the pretraining format whose lineage names the parent checkpoint.
`--resume` continues bit for bit, as pretraining does. Every FinetuneConfig field can be
overridden (`--help` lists them).
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from nanogpt_core.checkpoint import (CheckpointError, checkpoint_name, latest_checkpoint, model_config_of,
                                     read_checkpoint)
from nanogpt_core.config import (EXECUTION_FIELDS, FinetuneConfig, add_config_arguments, add_profile_argument,
                                 finetune_config_from_args)
from nanogpt_core.data.instructions import (InstructionDataError, InstructionLoader, InstructionManifest,
                                            is_prepared_folder, prepare_from_source)
from nanogpt_core.distributed import DistContext
from nanogpt_core.hf import HF_INIT_PREFIX, HFFormatError, import_hf
from nanogpt_core.lineage import code_version, git_commit
from nanogpt_core.model import GPT
from nanogpt_core.run_command import run_training_entrypoint
from nanogpt_core.schedule import cosine_lr
from nanogpt_core.train import (LoopPlan, TrainingObserver, TrainResult, add_resume_arguments, configure_backend,
                                run_in_process_group, run_training)

PREPARED_DATA_DIR = "data"
IMPORTED_INIT_DIR = "init"


def resolve_init_checkpoint(init: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to start from: `init` itself, or the newest complete one in a run folder."""
    init = Path(init)
    if init.is_dir():
        found = latest_checkpoint(init)
        if found is None:
            raise CheckpointError(f"no checkpoint to fine-tune from in {init}")
        return found
    return init, read_checkpoint(init)


def resolve_init(init: str | Path, out_dir: Path, ctx: DistContext) -> tuple[Path, dict[str, Any]]:
    """Like resolve_init_checkpoint, and `hf:DIR_OR_NAME` is imported (by rank 0) into the run folder first."""
    if str(init).startswith(HF_INIT_PREFIX):
        imported = out_dir / IMPORTED_INIT_DIR / checkpoint_name(0)
        if ctx.is_main:
            import_hf(str(init)[len(HF_INIT_PREFIX):], imported)
        if ctx.is_distributed:
            dist.barrier()  # the other ranks read what rank 0 just wrote
        init = imported
    return resolve_init_checkpoint(init)


def finetune(cfg: FinetuneConfig, init: str | Path, out_dir: str | Path, data: str | Path | None = None, *,
             resume: bool = False, observer: TrainingObserver | None = None,
             allow_changed_config: bool = False) -> TrainResult:
    """Run (or resume) fine-tuning; every rank calls this, rank 0 writes the files.

    `init`: a checkpoint, a run folder (its newest checkpoint), or `hf:DIR_OR_NAME`.
    `data`: a prepared instruction folder, a Dolly-style JSON-lines file or folder, or None
    for the profile's source.
    """
    return run_in_process_group(
        cfg.device, cfg.process_group_timeout_s,
        lambda ctx: _finetune(cfg, init, Path(out_dir), None if data is None else Path(data), resume, observer, ctx,
                              allow_changed_config))


def _finetune(cfg: FinetuneConfig, init: str | Path, out_dir: Path, data: Path | None, resume: bool,
              observer: TrainingObserver | None, ctx: DistContext, allow_changed_config: bool) -> TrainResult:
    configure_backend(cfg, ctx)
    grad_accum = cfg.grad_accum_steps(ctx.world_size)
    init_path, init_payload = resolve_init(init, out_dir, ctx)
    if init_path.parent.resolve() == out_dir.resolve():
        raise ValueError(f"--out {out_dir} holds the checkpoint being fine-tuned; write the fine-tuned run elsewhere")
    model_config = replace(model_config_of(init_payload, init_path), dropout=cfg.dropout)
    context_length = cfg.context_length or model_config.block_size
    if context_length > model_config.block_size:
        raise ValueError(f"context_length ({context_length}) exceeds the model's block_size "
                         f"({model_config.block_size})")

    data_dir = _prepared_data(cfg, data, out_dir, context_length, ctx)
    train_loader = InstructionLoader(data_dir, "train", cfg.micro_batch_size, ctx.rank, ctx.world_size,
                                     seed=cfg.seed, shuffle=True, pad_to_context=cfg.compile)
    manifest: InstructionManifest = train_loader.manifest
    if manifest.context_length > model_config.block_size:
        raise InstructionDataError(f"{data_dir} was prepared for {manifest.context_length}-token examples, longer "
                                   f"than the model's block_size ({model_config.block_size})")
    val_loader = None
    if manifest.examples["val"]:
        val_loader = InstructionLoader(data_dir, "val", cfg.micro_batch_size, ctx.rank, ctx.world_size,
                                       shuffle=False, pad_to_context=cfg.compile)

    max_steps = cfg.max_steps or cfg.epochs * train_loader.windows_per_epoch // grad_accum
    if max_steps == 0:
        raise InstructionDataError(f"{data_dir} has too few train examples ({manifest.examples['train']}) for one "
                                   f"step of {cfg.batch_size} examples")
    warmup_steps = min(max_steps, math.ceil(cfg.warmup_fraction * max_steps))

    model = GPT(model_config)
    try:
        model.load_state_dict(init_payload["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {init_path} does not fit its own model config: {e}") from e
    model.to(ctx.device)
    # Dropout masks should differ between ranks, which see different examples.
    torch.manual_seed(cfg.seed + ctx.rank)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.max_lr, ctx.device_type)

    lineage = {
        "stage": "finetune",
        "profile": cfg.profile,
        "data_dir": str(data_dir.resolve()),
        "data_version": manifest.data_version,
        "data_source": manifest.source,
        "code_version": code_version(),
        "git_commit": git_commit(),
        "parent_checkpoint": str(init_path.resolve()),
        "parent_step": init_payload["step"],
        "parent_data_version": init_payload["lineage"].get("data_version"),
        "parent_code_version": init_payload["lineage"].get("code_version"),
        "world_size": ctx.world_size,
    }
    plan = LoopPlan(
        max_steps=max_steps, grad_accum=grad_accum, grad_clip=cfg.grad_clip,
        lr_at=functools.partial(cosine_lr, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps,
                                max_steps=max_steps),
        val_every=cfg.val_every,
        val_steps=cfg.val_steps or (val_loader.windows_per_epoch if val_loader is not None else 0),
        checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last, seq_len=context_length,
        compile=cfg.compile, progress=train_loader.progress)
    if ctx.is_main:
        print(f"fine-tuning {init_path} on {manifest.examples['train']} examples ({manifest.source.get('kind')}, "
              f"data version {manifest.data_version}; skipped {manifest.skipped or 'none'}) for {max_steps} steps",
              flush=True)
    return run_training(model, optimizer, plan, train_loader, val_loader, ctx=ctx, out_dir=out_dir,
                        lineage=lineage, run_config={**cfg.to_dict(), "resolved_max_steps": max_steps},
                        resume=resume, observer=observer, execution_fields=EXECUTION_FIELDS,
                        allow_changed_config=allow_changed_config)


def _prepared_data(cfg: FinetuneConfig, data: Path | None, out_dir: Path, context_length: int,
                   ctx: DistContext) -> Path:
    """A prepared instruction folder: `data` itself, or one rank 0 prepares in the run folder."""
    if data is not None and is_prepared_folder(data):
        return data
    prepared = out_dir / PREPARED_DATA_DIR
    if ctx.is_main:
        source, path = ("local", data) if data is not None else (cfg.data_source, None)
        prepare_from_source(source, prepared, path=path, context_length=context_length,
                            val_fraction=cfg.val_fraction)
    if ctx.is_distributed:
        dist.barrier()  # the other ranks read what rank 0 just wrote
    return prepared


def _hf_init(text: str) -> str:
    if not text.startswith(HF_INIT_PREFIX) or len(text) == len(HF_INIT_PREFIX):
        raise argparse.ArgumentTypeError(f"expected {HF_INIT_PREFIX}DIR_OR_NAME, got {text!r}")
    return text


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_profile_argument(parser)
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="checkpoint to start from, or a run folder (its newest)")
    start.add_argument("--init-from", type=_hf_init, metavar="hf:DIR_OR_NAME",
                       help="a GPT-2 in Hugging Face format to import and start from: a folder, or a hub name")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, prepared data")
    parser.add_argument("--data", help="Dolly-style .jsonl file or folder, or a prepared instruction folder "
                                       "(default: the profile's source)")
    add_resume_arguments(parser)
    add_config_arguments(parser, FinetuneConfig)
    return parser


@record
def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)

    def run(observer):
        cfg = finetune_config_from_args(args)
        return finetune(cfg, args.init or args.init_from, args.out, args.data, resume=args.resume,
                        observer=observer, allow_changed_config=args.allow_changed_config)

    run_training_entrypoint(run, user_errors=(InstructionDataError, CheckpointError, HFFormatError, ValueError),
                            stage="finetune")


if __name__ == "__main__":
    main()
