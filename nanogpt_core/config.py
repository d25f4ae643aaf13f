"""Typed presets ("profiles") shared by the command line, the pipeline and the tests.

A profile describes a whole run: pretraining (model shape, batch, schedule, validation and
checkpoint cadence, the text source), fine-tuning (its schedule and instruction source) and
evaluation (the benchmark and how many of its examples). Any training field can be
overridden on the command line (`--n-layer 6`, `--max-lr 3e-4`), so a run is always "a
profile plus a few named changes", and the full resolved config is stored in every
checkpoint. This module is the one place where profiles and their flags are defined.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields, replace
from typing import Any, get_type_hints

from nanogpt_core.data.instructions import SOURCES as INSTRUCTION_SOURCES
from nanogpt_core.distributed import DEFAULT_PROCESS_GROUP_TIMEOUT_S
from nanogpt_core.eval.examples import BENCHMARKS, DEMO_CLOZE, HELLASWAG
from nanogpt_core.model import GPTConfig

PROFILE_ENV = "NANOGPT_PROFILE"

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
    # optimizer: AdamW for every parameter, unless muon_lr > 0 hands the blocks' weight matrices
    # to Muon (nanogpt_core.optim) with this peak rate, on the same warmup and decay
    muon_lr: float = 0.0
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
        if self.muon_lr < 0:
            raise ValueError(f"muon_lr must be 0 (AdamW only) or positive, got {self.muon_lr}")

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


@dataclass(frozen=True)
class FinetuneConfig:
    profile: str = "custom"
    data_source: str = "demo"  # demo | local | dolly, when no --data is given
    context_length: int = 0  # longest example in tokens; 0 means the model's block_size
    # duration: whole epochs over the train split, unless max_steps caps it
    epochs: int = 2
    max_steps: int = 0
    # batch: examples per optimizer step (all processes together), reached by accumulating
    # micro-batches of micro_batch_size examples per process
    batch_size: int = 32
    micro_batch_size: int = 8
    # schedule: linear warmup over a fraction of the steps, then cosine decay to min_lr
    max_lr: float = 2e-5
    min_lr: float = 2e-6
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dropout: float = 0.1
    # evaluation and checkpoints
    val_fraction: float = 0.05
    val_every: int = 100
    val_steps: int = 0  # 0: the whole val split
    checkpoint_every: int = 200
    keep_last: int = 2
    # reproducibility and hardware
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    compile: bool = False
    # seconds a collective waits for its peers before the run ends naming the missing rank
    process_group_timeout_s: float = DEFAULT_PROCESS_GROUP_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.data_source not in INSTRUCTION_SOURCES:
            raise ValueError(f"data_source must be one of {', '.join(INSTRUCTION_SOURCES)}, "
                             f"got {self.data_source!r}")
        for name in ("epochs", "batch_size", "micro_batch_size", "val_every", "checkpoint_every", "keep_last",
                     "process_group_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "val_steps", "context_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1], got {self.warmup_fraction}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds max_lr ({self.max_lr})")

    def grad_accum_steps(self, world_size: int) -> int:
        per_micro_step = self.micro_batch_size * world_size
        if self.batch_size % per_micro_step != 0:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size x processes "
                             f"({self.micro_batch_size} x {world_size} = {per_micro_step})")
        return self.batch_size // per_micro_step

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "finetune", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class BenchmarkConfig:
    """What checkpoints are scored on (see nanogpt_core.eval)."""
    benchmark: str = HELLASWAG  # hellaswag | demo-cloze; a given HellaSwag file wins over demo-cloze
    limit: int | None = None  # score the first `limit` examples; None: all of them

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {self.benchmark!r}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive or None, got {self.limit}")


@dataclass(frozen=True)
class Profile:
    """A whole run of the pipeline: pretraining, fine-tuning, evaluation, and where each one's data
    comes from (`pretrain.data_source`, `finetune.data_source`, `evaluation.benchmark`)."""
    pretrain: TrainConfig
    finetune: FinetuneConfig
    evaluation: BenchmarkConfig

    def __post_init__(self) -> None:
        if self.pretrain.profile != self.finetune.profile:
            raise ValueError(f"a profile's parts must carry its one name, got {self.pretrain.profile!r} "
                             f"and {self.finetune.profile!r}")

    @property
    def name(self) -> str:
        return self.pretrain.profile


PROFILES: dict[str, Profile] = {
    # The test suite: the whole DAG in well under two minutes on 2 CPU cores; fine-tuning is
    # 40 steps of the chatterbot conversations, seconds on a CPU.
    "micro": Profile(
        pretrain=TrainConfig(
            profile="micro", n_layer=2, n_head=2, n_embd=64, block_size=64,
            micro_batch_size=4, seq_len=64, total_batch_size=1024,
            max_steps=20, max_lr=3e-3, min_lr=3e-4, warmup_steps=2,
            val_every=10, val_steps=2, checkpoint_every=10, keep_last=3, data_source="demo"),
        finetune=FinetuneConfig(
            profile="micro", data_source="demo", epochs=1, max_steps=40, batch_size=8, micro_batch_size=4,
            max_lr=3e-3, min_lr=3e-4, warmup_fraction=0.1, dropout=0.0,
            val_every=20, val_steps=4, checkpoint_every=20, keep_last=3),
        evaluation=BenchmarkConfig(benchmark=DEMO_CLOZE, limit=40)),
    # The README's main command: ten minutes on a 2-core AVX2 CPU, offline text. Chosen by the
    # sweep in docs/BENCHMARKS.md ("Demo profile"): the 50,304-wide output layer is most of the
    # compute, so a 128-wide model (2.1x the 256-wide one's tokens a second) with 2,048-token
    # steps; 210 steps fit the budget at the measured 1.65-1.75 s a step. At that budget the
    # held-out loss is set by how much each step learns, not by the tokens: Muon for the blocks'
    # matrices (with AdamW at 8e-3 for the rest) took it from 6.24 to about 5.4, where no
    # AdamW rate, width, depth or batch had taken it below 6.23. Validation only at the
    # start and the end: the report card measures the frozen held-out set, and each validating
    # step cost as much as two plain ones.
    # Fine-tuning: one epoch of the chatterbot conversations (126 steps); two or three epochs
    # lowered its validation loss (5.3 -> 4.0) but not the replies, at two or three times the time.
    "demo": Profile(
        pretrain=TrainConfig(
            profile="demo", n_layer=4, n_head=2, n_embd=128, block_size=256,
            micro_batch_size=4, seq_len=256, total_batch_size=2048,
            max_steps=210, max_lr=8e-3, min_lr=8e-4, warmup_steps=10, muon_lr=1e-2,
            val_every=210, val_steps=1, checkpoint_every=210, keep_last=3, data_source="demo"),
        finetune=FinetuneConfig(
            profile="demo", data_source="demo", epochs=1, batch_size=16, micro_batch_size=8,
            max_lr=1.5e-3, min_lr=1.5e-4, warmup_fraction=0.05, dropout=0.0,
            val_every=1000, val_steps=0, checkpoint_every=1000, keep_last=2),
        evaluation=BenchmarkConfig(benchmark=DEMO_CLOZE, limit=200)),
    # GPT-2 small on FineWeb-Edu sample-10BT with the build-nanogpt schedule: ~10B tokens,
    # one epoch, on GPUs. Fine-tuning on databricks-dolly-15k: the usual full fine-tuning recipe
    # for a model this size (small learning rate, some dropout, no weight decay), two epochs,
    # about 900 steps. Scored on all of HellaSwag, downloaded when no file is given.
    "gpt2-124m": Profile(
        pretrain=TrainConfig(
            profile="gpt2-124m", n_layer=12, n_head=12, n_embd=768, block_size=1024,
            micro_batch_size=64, seq_len=1024, total_batch_size=524288,
            max_steps=19073, max_lr=6e-4, min_lr=6e-5, warmup_steps=715,
            val_every=250, val_steps=20, checkpoint_every=5000, keep_last=3,
            compile=True, data_source="fineweb-edu"),
        finetune=FinetuneConfig(
            profile="gpt2-124m", data_source="dolly", epochs=2, batch_size=32, micro_batch_size=16,
            max_lr=2e-5, min_lr=2e-6, warmup_fraction=0.03, dropout=0.1,
            val_every=100, val_steps=0, checkpoint_every=200, keep_last=2, compile=True),
        evaluation=BenchmarkConfig(benchmark=HELLASWAG, limit=None)),
}


def get_run_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def _with_overrides(config: Any, overrides: dict[str, Any], what: str) -> Any:
    unknown = set(overrides) - {f.name for f in fields(config)}
    if unknown:
        raise ValueError(f"unknown {what}field(s): {', '.join(sorted(unknown))}")
    return replace(config, **overrides)


def get_profile(name: str, **overrides: Any) -> TrainConfig:
    """The named profile's pretraining config, with any fields replaced by `overrides`."""
    return _with_overrides(get_run_profile(name).pretrain, overrides, "config ")


def get_finetune_profile(name: str, **overrides: Any) -> FinetuneConfig:
    """The named profile's fine-tuning config, with any fields replaced by `overrides`."""
    return _with_overrides(get_run_profile(name).finetune, overrides, "fine-tuning config ")


# ---------------------------------------------------------------------------------------------
# Command line: one flag per field of either config, defaulting to "keep the profile's"


def default_profile_name() -> str:
    return os.environ.get(PROFILE_ENV, "demo")


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=default_profile_name(),
                        help=f"{' | '.join(PROFILES)} (default: ${PROFILE_ENV}, else demo)")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type = TrainConfig,
                         skip: tuple[str, ...] = ("profile",)) -> None:
    """One optional flag per field of `config_type` (`--max-lr`), defaulting to "keep the profile's"."""
    hints = get_type_hints(config_type)
    group = parser.add_argument_group("config overrides (default: the profile's value)")
    for f in fields(config_type):
        if f.name in skip:
            continue
        kind = hints[f.name]
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                           type=_parse_bool if kind is bool else kind)


def overrides_from_args(args: argparse.Namespace, config_type: type = TrainConfig) -> dict[str, Any]:
    """The fields the command line set, by name."""
    return {f.name: getattr(args, f.name) for f in fields(config_type)
            if f.name != "profile" and getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return get_profile(args.profile, **overrides_from_args(args, TrainConfig))


def finetune_config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return get_finetune_profile(args.profile, **overrides_from_args(args, FinetuneConfig))
