"""Typed run configuration for each asset, shown in the Dagster launchpad.

`profile` picks one of nanogpt_core's presets (micro, demo, gpt2-124m); its default is the
environment variable NANOGPT_PROFILE, else demo. Other fields refine that preset.
"""


import os
from typing import Optional

import dagster as dg
from pydantic import Field, field_validator, model_validator

from nanogpt_core.config import PROFILES, TrainConfig, get_profile


def default_profile() -> str:
    return os.environ.get("NANOGPT_PROFILE", "demo")


class ProfileConfig(dg.Config):
    profile: str = Field(default_factory=default_profile,
                         description="micro | demo | gpt2-124m (default: $NANOGPT_PROFILE, else demo)")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; choose one of {', '.join(PROFILES)}")
        return value

    def train_config(self) -> TrainConfig:
        return get_profile(self.profile)


class RawTextConfig(ProfileConfig):
    source: Optional[str] = Field(None, description="fineweb-edu | local | folder | demo (default: the profile's)")
    path: Optional[str] = Field(None, description="file or folder for the local source; for the folder source, "
                                                  "default: $NANOGPT_INCOMING, else <artifacts>/incoming")
    limit: Optional[int] = Field(None, description="at most this many documents")


class ShardsConfig(dg.Config):
    val_fraction: float = Field(0.05, description="fraction of documents held out for validation")
    shard_tokens: int = Field(100_000_000, description="tokens per shard file")


class InstructionConfig(ProfileConfig):
    source: Optional[str] = Field(None, description="dolly | local | demo (default: the profile's)")
    path: Optional[str] = Field(None, description="JSON-lines file for the local source")
    limit: Optional[int] = None


class TorchrunConfig(ProfileConfig):
    nproc_per_node: int = Field(2, description="training processes per machine")
    nnodes: int = Field(1, description="machines; above 1, every node runs the same command")
    rdzv_endpoint: Optional[str] = Field(None, description="host:port of the c10d rendezvous for several nodes")
    max_steps: Optional[int] = Field(None, description="override the profile's step count")
    extra_args: list[str] = Field(default_factory=list, description="more trainer flags, e.g. ['--max-lr', '1e-3']")


class EvalConfig(ProfileConfig):
    benchmark: str = Field("auto", description="hellaswag | demo-cloze | auto (hellaswag when a file is "
                                               "reachable, else the demo cloze set for micro/demo)")
    data_path: Optional[str] = Field(None, description="HellaSwag JSON-lines file (default: $NANOGPT_HELLASWAG)")
    limit: Optional[int] = Field(None, description="examples to score (default: the profile's)")


# The checkpoints the evaluation scores, and of those, the ones a chat deployment may serve by
# default: only the fine-tuned model has seen the chat template; the pretrained score is kept
# as the reference it is compared with.
SCORED_CHECKPOINTS = ("pretrained_checkpoint", "finetuned_checkpoint")
CHAT_CHECKPOINTS = ("finetuned_checkpoint",)


class DeployConfig(dg.Config):
    model_id: str = Field("nanogpt", description="the stable alias clients ask for")
    max_regression: float = Field(
        0.01, ge=0.0, le=1.0,
        description="how far (in acc_norm) the candidate may score below the deployed model on the same "
                    "benchmark before the deployment is refused; 0 allows no regression")
    eligible: list[str] = Field(default_factory=lambda: list(CHAT_CHECKPOINTS),
                                description="checkpoints that may win the deployment (default: the fine-tuned "
                                            "one only, since the chat API needs an instruction-tuned model)")
    force: bool = Field(False, description="deploy even if the gate refuses; needs a reason, which the "
                                           "manifest records")
    rollback_to: Optional[str] = Field(None, description="redeploy this earlier deployment id instead of "
                                                         "choosing a winner (what the rollback job sets)")
    reason: Optional[str] = Field(None, description="why: required with force, recorded with a rollback")

    @field_validator("eligible")
    @classmethod
    def _scored_checkpoints_only(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in SCORED_CHECKPOINTS]
        if unknown or not value:
            raise ValueError(f"eligible must name some of {', '.join(SCORED_CHECKPOINTS)}; got {value!r}")
        return value

    @model_validator(mode="after")
    def _force_says_why(self) -> "DeployConfig":
        if self.force and not (self.reason or "").strip():
            raise ValueError("force: true needs a reason (config field 'reason'); the manifest records it")
        if self.force and self.rollback_to:
            raise ValueError("force and rollback_to exclude each other: a rollback skips the gate anyway")
        return self
