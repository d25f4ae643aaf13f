"""A real server for the serving tests: `python -m serving` on a free loopback port.

One server is shared by the whole session (starting one costs a few seconds). It serves
a deployment manifest that points at a small random GPT-2 (two layers, a 256-token
context), with two API keys configured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from nanogpt_core.checkpoint import save_checkpoint
from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from nanogpt_core.report_card import build_report_card, card_beside, write_card
from tests.helpers.ports import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
API_KEYS = ("sk-test-first", "sk-test-second", "sk-test-third")
SMALL_MODEL = GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=64)


def make_checkpoint(path: Path, *, seed: int, step: int) -> Path:
    torch.manual_seed(seed)
    lineage = {"git_commit": "0" * 40, "code_version": "test", "data_versions": {"token_shards": f"v{seed}"}}
    return save_checkpoint(path, GPT(SMALL_MODEL), step=step, lineage=lineage, metrics={"val_loss": 10.8})


@dataclass
class ServerProcess:
    args: list[str]
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "serving", *self.args, "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout: float = 60.0) -> ServerProcess:
        # Server settings come only from the test, never from the developer's shell; the
        # tokenizer cache location is the one variable worth inheriting.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("NANOGPT_") or k == "NANOGPT_CACHE_DIR"}
        env = {**inherited, **self.env, "PYTHONPATH": str(PROJECT_ROOT)}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=PROJECT_ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5.0).json()


@dataclass
class Deployment:
    server: ServerProcess
    manifest: Path
    checkpoint_dir: Path
    api_key: str = API_KEYS[0]

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def deployment(tmp_path_factory) -> Deployment:
    root = tmp_path_factory.mktemp("serving")
    checkpoint = make_checkpoint(root / "run" / "model_00001.pt", seed=1, step=1)
    # A real report card of the random model (replies and all), as the pipeline writes beside a checkpoint.
    write_card(card_beside(checkpoint), build_report_card(checkpoint, held_out=False, previous_deployment={
        "deployment_id": "deploy-0", "model_id": "nanogpt",
        "scores": {"benchmark": "demo-cloze", "acc": 0.24, "acc_norm": 0.25, "n": 100}}))
    write_manifest(root / "deployment" / "current.json", new_manifest(
        checkpoint_path=checkpoint, deployment_id="deploy-1", lineage={"token_shards": "v1"},
        scores={"benchmark": "demo-cloze", "acc": 0.25, "acc_norm": 0.26, "n": 100}))
    server = ServerProcess(
        args=["--manifest", str(root / "deployment" / "current.json"), "--threads", "1", "--max-batch", "8",
              "--max-queue", "64", "--poll-interval", "0.2"],
        env={"NANOGPT_API_KEYS": ",".join(API_KEYS)},
        log_path=root / "server.log",
    ).start()
    yield Deployment(server=server, manifest=root / "deployment" / "current.json", checkpoint_dir=root / "run")
    server.stop()


# A second server with the guards set away from their defaults: its own CORS origin and Host
# names, the schema pages on, a small body limit, and per-key limits (in memory).
GUARDED_KEYS = ("sk-guard", "sk-rate-a", "sk-rate-b", "sk-rate-c")
GUARDED_LIMITS = {"requests_per_minute": 10, "concurrent_requests": 2, "max_request_bytes": 2048}
GUARDED_ORIGIN = "https://chat.example.org"


def guarded_server_args(checkpoint: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--threads", "1", "--cors-origins", GUARDED_ORIGIN, "--enable-docs",
            "--allowed-hosts", "api.example.org,127.0.0.1",
            "--max-request-bytes", str(GUARDED_LIMITS["max_request_bytes"]),
            "--key-requests-per-minute", str(GUARDED_LIMITS["requests_per_minute"]),
            "--key-concurrent-requests", str(GUARDED_LIMITS["concurrent_requests"])]


@pytest.fixture(scope="session")
def guarded_server(tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("guarded")
    checkpoint = make_checkpoint(root / "model_00007.pt", seed=7, step=7)
    server = ServerProcess(args=guarded_server_args(checkpoint), env={"NANOGPT_API_KEYS": ",".join(GUARDED_KEYS)},
                           log_path=root / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openai_client(deployment):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=deployment.base_url, api_key=deployment.api_key, max_retries=0, timeout=60)
