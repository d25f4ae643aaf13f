"""Typed run configuration for each asset, shown in the Dagster launchpad.

`profile` picks one of nanogpt_core's presets (micro, demo, gpt2-124m); its default is the
environment variable NANOGPT_PROFILE, else demo. Other fields refine that preset.
"""


import os
from typing import Optional

import dagster as dg
from pydantic import Field, field_validator

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


class DeployConfig(dg.Config):
    model_id: str = Field("nanogpt", description="the stable alias clients ask for")
