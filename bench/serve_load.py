"""The server under load from a real load generator: one process against gunicorn with 2 workers.

    pip install -e '.[bench]'          # locust
    python bench/serve_load.py [--users 64] [--seconds 60] [--json results.json]

In one run, on the same machine and with the same random-weight model (the `demo` shape:
4 layers, 256 wide), locust drives `--users` concurrent OpenAI clients (see
`bench/locustfile.py`: half stream chat completions, half ask for plain completions, one in
eight hangs up mid-stream every time) against

  1. one `python -m serving` process (uvicorn), all cores to its one engine, and
  2. `gunicorn --config gunicorn_config.py serving.app:app` with 2 uvicorn workers,

while the deployment manifest is swapped twice (at one third and two thirds of the run) to
another checkpoint. Prints, per server: requests, failures (anything but a complete 200 or a
429/503 by design), refusals by design, hang-ups, time to the first streamed token (p50/p99),
and aggregate completion tokens per second. Locust itself runs on the same cores as the
server, as a client on the same host would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanogpt_core.checkpoint import save_checkpoint  # noqa: E402
from nanogpt_core.model import GPT, GPTConfig  # noqa: E402
from machine import cpu_model  # noqa: E402
from nanogpt_core.deployment_manifest import new_manifest, write_manifest  # noqa: E402

DEMO_SHAPE = GPTConfig(block_size=256, vocab_size=50304, n_layer=4, n_head=4, n_embd=256)
LOAD_KEY = "sk-load-test"
MAX_BATCH = 8


@dataclass
class Target:
    name: str
    command: list[str]
    env: dict[str, str]
    workers: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoints(folder: Path) -> list[Path]:
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lineage = {"git_commit": "0" * 40, "code_version": "bench", "data_versions": {"token_shards": f"bench-{seed}"}}
        paths.append(save_checkpoint(folder / f"run{seed}" / f"model_{seed:05d}.pt", GPT(DEMO_SHAPE), step=seed,
                                     lineage=lineage, metrics={}))
    return paths


SERVER_NAMES = {"single": "1 uvicorn process", "gunicorn": "gunicorn, 2 uvicorn workers"}


def server_target(server: str, manifest: Path, port: int, cores: int) -> Target:
    common = {"NANOGPT_API_KEYS": LOAD_KEY, "NANOGPT_MANIFEST": str(manifest), "NANOGPT_POLL_INTERVAL": "0.5",
              "NANOGPT_MAX_BATCH": str(MAX_BATCH), "NANOGPT_LOG_LEVEL": "warning"}
    if server == "single":
        return Target(SERVER_NAMES["single"], [sys.executable, "-m", "serving", "--manifest", str(manifest),
                                          "--port", str(port), "--threads", str(cores), "--log-level", "warning"],
                      common, workers=1)
    return Target(SERVER_NAMES["gunicorn"],
                      [sys.executable, "-m", "gunicorn", "--config", "gunicorn_config.py", "serving.app:app"],
                      {**common, "NANOGPT_BIND": f"127.0.0.1:{port}", "NANOGPT_WORKERS": "2",
                       "NANOGPT_THREADS": str(max(1, cores // 2)),
                   "PROMETHEUS_MULTIPROC_DIR": str(manifest.parent / "metrics")}, workers=2)


def wait_until_serving(url: str, workers: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until /health answers, from `workers` distinct processes when there are several."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it served")
        try:
            # A new connection each time, so that the kernel can hand it to any worker.
            response = httpx.get(url + "/health", timeout=5)
            if response.status_code == 200:
                seen.add(response.headers.get("x-worker-pid", "single"))
                if len(seen) >= workers:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer /health from {workers} workers within {timeout} s")


def swap_twice(manifest: Path, checkpoints: list[Path], seconds: float, log: list[dict]) -> threading.Thread:
    """Point the manifest at the other checkpoint at one third and at two thirds of the run."""
    def swap() -> None:
        for i in (1, 2):
            time.sleep(seconds / 3)
            deployment_id = f"load-{i + 1}"
            write_manifest(manifest, new_manifest(checkpoint_path=checkpoints[i % 2], deployment_id=deployment_id))
            log.append({"deployment_id": deployment_id, "at_s": round(i * seconds / 3, 1)})
    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    return thread


def run_locust(url: str, users: int, seconds: int, results: Path, log: Path) -> None:
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
               "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s",
               "--host", url, "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, "NANOGPT_LOAD_KEY": LOAD_KEY, "NANOGPT_LOAD_RESULTS": str(results)}
    with log.open("w") as out:
        # locust exits 1 when any request failed; the figures say how many, so that is not an error here.
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 120)
    if not results.exists():
        raise RuntimeError(f"locust wrote no results; its log:\n{log.read_text()[-3000:]}")


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def measure(server_name: str, workdir: Path, checkpoints: list[Path], users: int, seconds: int) -> dict:
    manifest = workdir / "deployment" / "current.json"
    write_manifest(manifest, new_manifest(checkpoint_path=checkpoints[0], deployment_id="load-1"))
    port = free_port()
    target = server_target(server_name, manifest, port, os.cpu_count() or 2)
    (manifest.parent / "metrics").mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    server_log = workdir / "server.log"
    with server_log.open("w") as out:
        server = subprocess.Popen(target.command, cwd=ROOT, env={**os.environ, **target.env}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_serving(url, target.workers, server)
        swaps: list[dict] = []
        swapper = swap_twice(manifest, checkpoints, seconds, swaps)
        results_path = workdir / "locust_results.json"
        started = time.monotonic()
        run_locust(url, users, seconds, results_path, workdir / "locust.log")
        elapsed = time.monotonic() - started
        swapper.join(timeout=5)
        served = httpx.get(url + "/health", timeout=10).json().get("deployment_id")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    figures = json.loads(results_path.read_text())
    ttft = figures["ttft_s"]
    return {
        "server": target.name, "users": users, "seconds": seconds, "elapsed_s": round(elapsed, 1),
        "requests": figures["requests"], "failed": figures["failed"], "failures": figures["failures"],
        "refused_by_design": figures["refused_by_design"], "hung_up": figures["hung_up"],
        "streams_completed": figures["streams_completed"], "completions_completed": figures["completions_completed"],
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1), "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
        "first_tokens": len(ttft), "completion_tokens": figures["completion_tokens"],
        "tokens_per_s": round(figures["completion_tokens"] / seconds, 1),
        "requests_per_s": round(figures["requests"] / seconds, 2),
        "swaps": swaps, "deployment_served_at_end": served,
    }


def print_table(rows: list[dict]) -> None:
    print("| round | server | requests | streams done | completions done | hung up | failed | 429/503 "
          "| TTFT p50 | TTFT p99 | tokens/s | requests/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['round']} | {r['server']} | {r['requests']} | {r['streams_completed']} | "
              f"{r['completions_completed']} | {r['hung_up']} | {r['failed']} | {r['refused_by_design']} | "
              f"{r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | {r['tokens_per_s']:.1f} | "
              f"{r['requests_per_s']:.2f} |")
    print()
    for round_number in sorted({r["round"] for r in rows}):
        in_round = {r["server"]: r for r in rows if r["round"] == round_number}
        base, other = in_round[SERVER_NAMES["single"]], in_round[SERVER_NAMES["gunicorn"]]
        print(f"round {round_number}, {other['server']} vs {base['server']}: "
              f"tokens/s x{other['tokens_per_s'] / base['tokens_per_s']:.2f}, "
              f"TTFT p50 x{other['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}, "
              f"p99 x{other['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}")
    for r in rows:
        print(f"round {r['round']}, {r['server']}: swaps {[s['deployment_id'] for s in r['swaps']]}, "
              f"serving {r['deployment_served_at_end']} at the end; failures: {r['failures'] or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat both servers, in ABBA order, to see how much the machine drifts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
          f"{args.users} users for {args.seconds} s each; model: demo shape, random weights, "
          f"max_tokens {os.environ.get('NANOGPT_LOAD_MAX_TOKENS', '32')}, max batch {MAX_BATCH} per engine")
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        checkpoints = make_checkpoints(Path(tmp) / "checkpoints")
        for round_number in range(1, args.rounds + 1):
            order = ("single", "gunicorn") if round_number % 2 else ("gunicorn", "single")
            for server in order:
                workdir = Path(tmp) / f"{server}_{round_number}"
                workdir.mkdir()
                rows.append({"round": round_number,
                             **measure(server, workdir, checkpoints, args.users, args.seconds)})
                print(f"round {round_number}, {rows[-1]['server']}: done", flush=True)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_model(), "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
