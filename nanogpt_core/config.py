"""Typed training presets ("profiles") shared by the command line, the pipeline and the tests.

A profile names everything a run needs: model shape, batch, schedule, evaluation and
checkpoint cadence, and where the text comes from. Any field can be overridden on the
command line (`--n-layer 6`, `--max-lr 3e-4`), so a run is always "a profile plus a few
named changes", and the full resolved config is stored in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any, get_type_hints

from nanogpt_core.distributed import DEFAULT_PROCESS_GROUP_TIMEOUT_S
from nanogpt_core.model import GPTConfig

AUTOCAST_MODES = ("auto", "bf16", "off")
# Fields that change how a run executes or reports, not what it optimises: a resumed run may
# set them differently. Every other field must match the checkpoint's (see train.check_resume_matches);
# the profile's name is one of these because its resolved fields are compared instead.
EXECUTION_FIELDS = frozenset({"profile", "val_every", "val_steps", "checkpoint_every", "keep_last", "device",
                              "threads", "compile", "autocast", "process_group_timeout_s"})


@dataclass(frozen=True)
class TrainConfig:
    profile: str = "custom"
    # model shape
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    dropout: float = 0.0
    # batch: each optimizer step sees total_batch_size tokens, reached by gradient
    # accumulation over micro-batches of micro_batch_size x seq_len tokens per process
    micro_batch_size: int = 64
    seq_len: int = 1024
    total_batch_size: int = 524288
    # schedule: linear warmup to max_lr, cosine decay to min_lr at max_steps
    max_steps: int = 19073
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # evaluation and checkpoints
    val_every: int = 250
    val_steps: int = 20
    checkpoint_every: int = 5000
    keep_last: int = 3
    # reproducibility and hardware
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads per process; 0 shares the cores among local processes
    compile: bool = False
    # bf16 autocast: "auto" turns it on for CUDA only (on the CPUs this was tuned on fp32 is
    # faster); "bf16" turns it on for any device, so a CPU run takes the GPU's precision path
    autocast: str = "auto"  # auto | bf16 | off
    # seconds a collective waits for its peers before the run ends naming the missing rank
    process_group_timeout_s: float = DEFAULT_PROCESS_GROUP_TIMEOUT_S
    # where the pretraining text comes from (see nanogpt_core.data)
    data_source: str = "demo"

    def __post_init__(self) -> None:
        if self.seq_len > self.block_size:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds block_size ({self.block_size})")
        for name in ("micro_batch_size", "seq_len", "total_batch_size", "max_steps", "keep_last",
                     "process_group_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must lie in [0, max_steps={self.max_steps}]")
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {self.autocast!r}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds max_lr ({self.max_lr})")

    def model_config(self) -> GPTConfig:
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout)

    def grad_accum_steps(self, world_size: int) -> int:
        tokens_per_micro_step = self.micro_batch_size * self.seq_len * world_size
        if self.total_batch_size % tokens_per_micro_step != 0:
            raise ValueError(
                f"total_batch_size ({self.total_batch_size}) must be a multiple of micro_batch_size x seq_len x "
                f"processes ({self.micro_batch_size} x {self.seq_len} x {world_size} = {tokens_per_micro_step})")
        return self.total_batch_size // tokens_per_micro_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES: dict[str, TrainConfig] = {
    # The test suite: the whole DAG in well under two minutes on 2 CPU cores.
    "micro": TrainConfig(
        profile="micro", n_layer=2, n_head=2, n_embd=64, block_size=64,
        micro_batch_size=4, seq_len=64, total_batch_size=1024,
        max_steps=20, max_lr=3e-3, min_lr=3e-4, warmup_steps=2,
        val_every=10, val_steps=2, checkpoint_every=10, keep_last=3, data_source="demo"),
    # The README's main command: a few minutes on a 2-core CPU, offline text, a model that
    # visibly learns (loss from ~10.9 to well under 7).
    "demo": TrainConfig(
        profile="demo", n_layer=4, n_head=4, n_embd=256, block_size=256,
        micro_batch_size=8, seq_len=256, total_batch_size=4096,
        max_steps=150, max_lr=2e-3, min_lr=2e-4, warmup_steps=10,
        val_every=50, val_steps=4, checkpoint_every=50, keep_last=3, data_source="demo"),
    # GPT-2 small on FineWeb-Edu sample-10BT with the build-nanogpt schedule: ~10B tokens,
    # one epoch, on GPUs.
    "gpt2-124m": TrainConfig(
        profile="gpt2-124m", n_layer=12, n_head=12, n_embd=768, block_size=1024,
        micro_batch_size=64, seq_len=1024, total_batch_size=524288,
        max_steps=19073, max_lr=6e-4, min_lr=6e-5, warmup_steps=715,
        val_every=250, val_steps=20, checkpoint_every=5000, keep_last=3,
        compile=True, data_source="fineweb-edu"),
}


def get_profile(name: str, **overrides: Any) -> TrainConfig:
    """The named preset, with any fields replaced by `overrides`."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    return replace(PROFILES[name], **overrides)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("profile",)) -> None:
    """One optional flag per TrainConfig field (`--max-lr`), defaulting to "keep the profile's"."""
    hints = get_type_hints(TrainConfig)
    group = parser.add_argument_group("config overrides (default: the profile's value)")
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        kind = hints[f.name]
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                           type=_parse_bool if kind is bool else kind)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name != "profile" and getattr(args, f.name, None) is not None}
    return get_profile(args.profile, **overrides)

