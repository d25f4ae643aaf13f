"""The GPU check on a machine without CUDA: every part at the micro shape, as on a bare GPU machine.

The CPU run takes the same code paths the GPU run takes (torch.compile, bf16 autocast,
torchrun with a real process group, the serving engine, the batched scorer), and it runs
with the packages a bare GPU machine lacks made unimportable, so a module that starts to
need one of them at import time fails here first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_core.eval.examples import read_examples_file
from nanogpt_core.shards import ShardManifest
from nanogpt_core.tokenizer import RANKS_SHA256

from ..conftest import PROJECT_ROOT, python_env

pytestmark = pytest.mark.slow

SCRIPT = PROJECT_ROOT / "bench" / "gpu_check.py"
# Installed here for the server and the pipeline, absent on the GPU machine.
ABSENT_ON_GPU_MACHINE = ("fastapi", "pydantic", "pydantic_core", "starlette", "uvicorn", "gunicorn", "dagster",
                         "dagster_pipes", "datasets", "transformers", "huggingface_hub", "prometheus_client", "tqdm")
SITECUSTOMIZE = f'''
import importlib.machinery
import sys

ABSENT = {set(ABSENT_ON_GPU_MACHINE)!r}


class PathFinderWithoutAbsentees:
    """The usual path finder, which finds none of ABSENT: to importlib they are not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @staticmethod
    def invalidate_caches():
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [PathFinderWithoutAbsentees if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
'''
# Enough for one step of 8 GPUs x 32 sequences x 1024 tokens, the GPU run's default batch.
EIGHT_GPU_WINDOW = 8 * 32 * 1024 + 1


def run_check(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_check") / "carry"
    proc = run_check("--prepare", str(folder), env=python_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory) -> dict[str, str]:
    """The test environment minus the server's and the pipeline's packages."""
    site = tmp_path_factory.mktemp("bare_site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = python_env()
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    probe = subprocess.run([sys.executable, "-c", "import fastapi"], capture_output=True, text=True, env=env)
    assert "No module named 'fastapi'" in probe.stderr, "fastapi is still importable"
    return env


@pytest.fixture(scope="module")
def cpu_check(prepared, bare_env, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu_check_out")
    proc = run_check("--data", str(prepared), "--out", str(out), "--device", "cpu", env=bare_env)
    report_path = out / "gpu_check.json"
    assert report_path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report_path.read_text()), (out / "gpu_check.md").read_text()


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_prepare_carries_the_tokenizer_shards_and_examples_in_a_few_megabytes(prepared):
    tokenizer = prepared / "cache" / "gpt2.tiktoken"
    assert hashlib.sha256(tokenizer.read_bytes()).hexdigest() == RANKS_SHA256
    manifest = ShardManifest.load(prepared / "shards")
    assert manifest.tokens["train"] >= EIGHT_GPU_WINDOW and manifest.tokens["val"] >= EIGHT_GPU_WINDOW
    described = json.loads((prepared / "prepared.json").read_text())
    assert len(read_examples_file(prepared / described["examples"]).examples) >= 32
    size = sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file())
    assert size < 8 * 2**20


def test_every_part_passes_on_the_cpu_without_the_server_and_pipeline_packages(cpu_check):
    proc, report, _ = cpu_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report["ok"] and report["failed"] == []
    for section in ("engine", "hellaswag", "train", "distributed"):
        assert report[section]["ok"], (section, report[section])
    assert "train_eager" not in report  # only run when the compiled run fails
    assert report["environment"]["device"] == "cpu"


def test_training_ran_compiled_in_bf16_under_torchrun_with_two_gloo_processes(cpu_check):
    _, report, _ = cpu_check
    train = report["train"]
    assert (train["profile"], train["compile"], train["autocast"], train["world_size"]) == ("micro", True, "bf16", 2)
    assert train["timed_steps"] == report["plan"]["timed_steps"] and train["checkpoint"]
    for figure in ("tokens_per_s", "tokens_per_s_best", "step_ms_median", "mfu", "peak_rss_mib", "first_step_s"):
        assert finite_positive(train[figure]), (figure, train[figure])
    assert train["tokens_per_step"] == 4 * 64 * 2 * 2  # micro batch x seq_len x accumulation x processes
    assert math.isfinite(train["loss_first"]) and math.isfinite(train["loss_last"])
    distributed = report["distributed"]
    assert (distributed["backend"], distributed["world_size"], distributed["all_reduce_sum_ok"]) == ("gloo", 2, True)
    assert finite_positive(distributed["all_reduce_bus_gb_s"])


def test_engine_and_hellaswag_report_rates_and_latencies(cpu_check):
    _, report, _ = cpu_check
    engine = report["engine"]
    assert engine["streams"] == 8
    for figure in ("streams_1_tokens_per_s", "streams_1_ttft_ms", "streams_n_tokens_per_s",
                   "streams_n_ttft_ms_median", "streams_n_ttft_ms_max", "long_prompt_ttft_ms"):
        assert finite_positive(engine[figure]), (figure, engine[figure])
    hellaswag = report["hellaswag"]
    assert hellaswag["examples"] == 32 and finite_positive(hellaswag["examples_per_s"])
    assert 0 <= hellaswag["acc_norm_random_weights"] <= 1


def test_the_table_is_written_and_printed(cpu_check):
    proc, _, table = cpu_check
    assert table in proc.stdout
    for row in ("| train | tokens/s", "| train | MFU", "| engine | 8 streams", "| hellaswag | examples/s",
                "| distributed | backend | gloo |"):
        assert row in table


def test_a_failed_part_is_reported_with_its_error_and_the_others_still_run(prepared, bare_env, tmp_path):
    broken = tmp_path / "carry"
    shutil.copytree(prepared, broken)
    examples = broken / json.loads((broken / "prepared.json").read_text())["examples"]
    examples.unlink()
    # No C++ compiler (and no cached kernels): torch.compile fails as on a machine without gcc.
    env = {**bare_env, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = tmp_path / "out"
    proc = run_check("--data", str(broken), "--out", str(out), "--device", "cpu", "--timed-steps", "1", env=env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed"] == ["hellaswag", "train"]
    assert str(examples) in report["hellaswag"]["error"]
    assert "compiler" in report["train"]["error"].lower()
    eager = report["train_eager"]
    assert eager["ok"] and eager["compile"] is False and finite_positive(eager["tokens_per_s"])
    assert report["distributed"]["ok"] and report["distributed"]["from"] == "train_eager"
    assert report["engine"]["ok"]
    assert "| hellaswag | FAILED |" in (out / "gpu_check.md").read_text()


def test_an_unprepared_folder_is_refused_with_how_to_prepare_one(tmp_path):
    proc = run_check("--data", str(tmp_path), "--out", str(tmp_path / "out"), env=python_env(), timeout=120)
    assert proc.returncode != 0
    assert "not a prepared check folder" in proc.stderr and f"--prepare {tmp_path}" in proc.stderr
