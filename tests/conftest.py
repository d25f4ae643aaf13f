"""Shared fixtures: shards of the offline demo corpus, and launching the trainer for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo corpus as a shard folder (about half a million tokens), built once per session."""
    from nanogpt_core.data.demo_corpus import iter_demo_documents
    from nanogpt_core.shards import build_shards

    out = tmp_path_factory.mktemp("demo_shards")
    build_shards((d.text for d in iter_demo_documents()), out, val_fraction=0.05, source={"kind": "demo"})
    return out


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_module(module: str, *args: str, nproc: int | None = None, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m module args` directly, or under a real torchrun with `nproc` processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    proc = subprocess.run([*launcher, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=python_env(), cwd=PROJECT_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
