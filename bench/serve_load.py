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

    python bench/serve_load.py --heavy [--shape demo|gpt2-124m] [--seconds 20] [--heavy-users 2]

`--heavy` asks instead whether a valid but expensive request slows other callers down. One
`python -m serving` process with two API keys serves a random-weight model of `--shape`;
one key sends a short greedy chat request (16 tokens, not streamed) after another, the
victim, and the other key runs `--heavy-users` users that each send one heavy request type
in a loop: the largest `logit_bias`, the longest prompt list, the longest stop strings,
`top_logprobs` at its maximum while streaming, a prompt that fills the context. Each
request is as large as the server's limits allow. Phases of `--seconds` alternate, the
victim alone and with one heavy type, alone again, with the next type, ..., so that every
phase with a heavy load sits between two without, and drift shows. Prints, per heavy type,
the victim's median latency alone (the phases before and after) and with the load, their
ratio, how many victim requests each phase had (all must succeed), and what became of the
heavy requests: done, refused by design (429, 503) or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import string
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
from nanogpt_core.prompts import chat_to_prompt, prompt_token_ids  # noqa: E402
from nanogpt_core.tokenizer import EOT_TOKEN  # noqa: E402

DEMO_SHAPE = GPTConfig(block_size=256, vocab_size=50304, n_layer=4, n_head=4, n_embd=256)
SHAPES = {"demo": DEMO_SHAPE,
          "gpt2-124m": GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)}
LOAD_KEY = "sk-load-test"
MAX_BATCH = 8
MAX_QUEUE = 64  # the server's default

HEAVY_KEY, VICTIM_KEY = "sk-heavy", "sk-victim"
HEAVY_MAX_TOKENS = 200
# A prompt that fills the context leaves room for as many tokens as the victim asks for.
CONTEXT_ROW_MAX_TOKENS = 16
# Seconds the heavy users run before the victim starts timing, so that it meets the load in full.
HEAD_START_S = 3
# Until the server declares its own limit on logit_bias entries.
LOGIT_BIAS_ENTRIES = 300
HEAVY_MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


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


def make_checkpoints(folder: Path, shape: GPTConfig = DEMO_SHAPE, seeds: tuple[int, ...] = (1, 2)) -> list[Path]:
    paths = []
    for seed in seeds:
        torch.manual_seed(seed)
        lineage = {"git_commit": "0" * 40, "code_version": "bench", "data_versions": {"token_shards": f"bench-{seed}"}}
        paths.append(save_checkpoint(folder / f"run{seed}" / f"model_{seed:05d}.pt", GPT(shape), step=seed,
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


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (gunicorn's workers too), SIGKILL if it lingers."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def run_locust(url: str, users: int, seconds: int, results: Path, log: Path,
               user_classes: tuple[str, ...] = ("OpenAIClient",), extra_env: dict[str, str] | None = None,
               stop_timeout: int = 30) -> None:
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), *user_classes,
               "--headless", "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s",
               "--host", url, "--stop-timeout", str(stop_timeout), "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, "NANOGPT_LOAD_KEY": LOAD_KEY, "NANOGPT_LOAD_RESULTS": str(results), **(extra_env or {})}
    with log.open("w") as out:
        # locust exits 1 when any request failed; the figures say how many, so that is not an error here.
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + stop_timeout + 90)
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
        stop_server(server)
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


# --- heavy but valid requests against another caller's short one ---------------------------------


def logit_bias_limit() -> int:
    from serving import schemas
    return getattr(schemas, "MAX_LOGIT_BIAS", LOGIT_BIAS_ENTRIES)


def heavy_requests(shape: GPTConfig, max_batch: int, max_queue: int) -> list[dict]:
    """Each heavy request type, as large as the server's limits allow."""
    from serving import schemas
    from serving.fair_share import caller_queue_share

    n = min(schemas.MAX_N, max_batch)
    chat_prompt = len(prompt_token_ids(chat_to_prompt(HEAVY_MESSAGES)))
    max_tokens = min(HEAVY_MAX_TOKENS, shape.block_size - chat_prompt)
    chat = {"model": "nanogpt", "messages": HEAVY_MESSAGES, "max_tokens": max_tokens, "n": n}
    chosen = random.Random(0)  # the same tokens and strings in every run
    bias_entries = logit_bias_limit()
    bias = {str(t): round(chosen.uniform(-5, 5), 2) for t in chosen.sample(range(EOT_TOKEN), bias_entries)}
    # Random letters, so long that the model cannot write one out by chance.
    stops = ["".join(chosen.choices(string.ascii_letters, k=schemas.MAX_STOP_SEQUENCE_CHARS))
             for _ in range(schemas.MAX_STOP_SEQUENCES)]
    prompt_list = caller_queue_share(max_queue)
    context_prompt = [chosen.randrange(EOT_TOKEN) for _ in range(shape.block_size - CONTEXT_ROW_MAX_TOKENS)]
    return [
        {"name": f"logit_bias {bias_entries} entries, n={n}, max_tokens {max_tokens}",
         "path": "/v1/chat/completions", "body": {**chat, "logit_bias": bias}},
        {"name": f"prompt list of {prompt_list}, n=1, max_tokens {max_tokens}",
         "path": "/v1/completions", "body": {"model": "nanogpt", "max_tokens": max_tokens,
                                            "prompt": [f"{i}. The history of the printing press begins"
                                                       for i in range(prompt_list)]}},
        {"name": f"stop {len(stops)} x {len(stops[0])} chars, n={n}, max_tokens {max_tokens}, streamed",
         "path": "/v1/chat/completions", "body": {**chat, "stop": stops, "stream": True}},
        {"name": f"top_logprobs {schemas.MAX_TOP_LOGPROBS}, n={n}, max_tokens {max_tokens}, streamed",
         "path": "/v1/chat/completions",
         "body": {**chat, "logprobs": True, "top_logprobs": schemas.MAX_TOP_LOGPROBS, "stream": True}},
        {"name": f"prompt of {len(context_prompt)} tokens + {CONTEXT_ROW_MAX_TOKENS} = context, n={n}",
         "path": "/v1/completions", "body": {"model": "nanogpt", "prompt": context_prompt,
                                            "max_tokens": CONTEXT_ROW_MAX_TOKENS, "n": n}},
        largest_body(n, bias),
    ]


def largest_body(n: int, bias: dict[str, float]) -> dict:
    """A chat at every bound at once, just under the 1 MiB body limit: the most messages, the
    largest logit_bias, n at its most. Far over any context, it is refused (400) only once read,
    validated and tokenized: all of the admission work, none of the decoding."""
    from serving import schemas
    from serving.settings import MIB

    words = "the quick brown fox jumps over the lazy dog, 1234567890".split()
    text = " ".join(words[i % len(words)] for i in range(MIB // len(words)))

    def body(chars: int) -> dict:
        messages = [{"role": ("user", "assistant")[i % 2], "content": text[i:i + chars]}
                    for i in range(schemas.MAX_MESSAGES - 1)] + [{"role": "user", "content": "Hello"}]
        return {"model": "nanogpt", "n": n, "max_tokens": 16, "messages": messages, "logit_bias": bias}

    chars = MIB // schemas.MAX_MESSAGES
    while len(json.dumps(body(chars)).encode()) > MIB - 1024:  # the headers' share aside
        chars -= 8
    return {"name": f"largest body: {schemas.MAX_MESSAGES} messages, {len(bias)} biases, n={n}, "
                    f"{len(json.dumps(body(chars))) // 1024} KiB (refused: over the context)",
            "path": "/v1/chat/completions", "body": body(chars), "expect_status": 400,
            # Not a valid request, so outside the 3x goal: it is here for /health while the most a
            # body can ask of admission is done, without pause (a flood that per-key limits bound).
            "goal": False}


def load_gauges(url: str) -> tuple[float, float]:
    """The server's queue depth and samples being decoded, from /metrics."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {VICTIM_KEY}"}, timeout=10).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("nanogpt_queue_depth", "nanogpt_active_sequences"):
            values[name] = float(value)
    return values.get("nanogpt_queue_depth", 0.0), values.get("nanogpt_active_sequences", 0.0)


def wait_until_idle(url: str, timeout: float = 180) -> float:
    """Seconds until nothing is queued or decoding, so that an alone phase starts alone."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if load_gauges(url) == (0.0, 0.0):
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"the server was still busy {timeout} s after the load stopped")


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1) if values else float("nan")


def run_phase(url: str, workdir: Path, label: str, heavy: dict | None, heavy_users: int, seconds: int) -> dict:
    """The victim for `seconds`, alone or with `heavy_users` users sending `heavy` from the other key."""
    results, request_file = workdir / f"{label}.json", workdir / f"{label}_request.json"
    env = {"NANOGPT_VICTIM_KEY": VICTIM_KEY, "NANOGPT_HEAVY_KEY": HEAVY_KEY, "NANOGPT_VICTIM_DELAY_S": "0"}
    classes, users, run_time = ("Victim", "HealthWatcher"), 2, seconds
    if heavy is not None:
        request_file.write_text(json.dumps({"path": heavy["path"], "body": heavy["body"],
                                            "expect_status": heavy.get("expect_status", 200)}))
        env.update(NANOGPT_HEAVY_REQUEST=str(request_file), NANOGPT_VICTIM_DELAY_S=str(HEAD_START_S))
        classes, users, run_time = ("Victim", "HealthWatcher", "HeavyCaller"), 2 + heavy_users, seconds + HEAD_START_S
    run_locust(url, users, run_time, results, workdir / f"{label}.log", user_classes=classes, extra_env=env,
               stop_timeout=180)
    drained_s = wait_until_idle(url)
    figures = json.loads(results.read_text())
    victim = figures["victim_latency_s"]
    return {
        "label": label, "heavy": heavy["name"] if heavy else None,
        "goal": bool(heavy and heavy.get("goal", True)), "seconds": seconds,
        "victim_requests": len(victim), "victim_failed": figures["victim_failed"],
        "victim_median_ms": median_ms(victim), "victim_p90_ms": round(percentile(victim, 90) * 1000, 1),
        "victim_tokens_min": min(figures["victim_tokens"], default=None),
        "heavy_done": len(figures["heavy_latency_s"]),
        "heavy_median_s": round(median_ms(figures["heavy_latency_s"]) / 1000, 2),
        "heavy_refused_429": figures["heavy_refused"]["429"], "heavy_refused_503": figures["heavy_refused"]["503"],
        "heavy_failed": figures["heavy_failed"], "locust_failures": figures["failures"],
        "drained_s": round(drained_s, 1), "victim_latency_s": [round(v, 4) for v in victim],
        "health_p99_ms": round(percentile(figures["health_latency_s"], 99) * 1000, 1),
        "health_max_ms": round(max(figures["health_latency_s"], default=float("nan")) * 1000, 1),
    }


def heavy_rows(phases: list[dict]) -> list[dict]:
    """One row per phase with a heavy load, against the alone phases on either side of it."""
    rows = []
    for i, phase in enumerate(phases):
        if phase["heavy"] is None:
            continue
        before, after = phases[i - 1], phases[i + 1]
        alone = median_ms(before["victim_latency_s"] + after["victim_latency_s"])
        rows.append({"heavy": phase["heavy"], "goal": phase["goal"], "round": phase["round"],
                     "alone_before_ms": before["victim_median_ms"],
                     "alone_before_n": before["victim_requests"], "with_ms": phase["victim_median_ms"],
                     "with_n": phase["victim_requests"], "alone_after_ms": after["victim_median_ms"],
                     "alone_after_n": after["victim_requests"], "alone_ms": alone,
                     "ratio": round(phase["victim_median_ms"] / alone, 2),
                     "victim_failed": before["victim_failed"] + phase["victim_failed"] + after["victim_failed"],
                     **{k: phase[k] for k in ("heavy_done", "heavy_median_s", "heavy_refused_429",
                                              "heavy_refused_503", "heavy_failed", "health_p99_ms",
                                              "health_max_ms")}})
    return rows


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes in serving/" if git("status", "--porcelain", "serving") else "")


def measure_heavy(shape_name: str, heavy_users: int, seconds: int, rounds: int, tmp: Path,
                  only: str | None = None) -> dict:
    from serving.fair_share import caller_queue_share, caller_slot_share

    shape = SHAPES[shape_name]
    checkpoint = make_checkpoints(tmp / "checkpoints", shape, seeds=(1,))[0]
    cores = os.cpu_count() or 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "serving", "--checkpoint", str(checkpoint), "--port", str(port),
               "--threads", str(cores), "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
               "--log-level", "warning"]
    settings = {"max_batch": MAX_BATCH, "max_queue": MAX_QUEUE, "threads": cores,
                "caller_slot_share": caller_slot_share(MAX_BATCH), "caller_queue_share": caller_queue_share(MAX_QUEUE),
                "api_keys": 2}
    heavies = [h for h in heavy_requests(shape, MAX_BATCH, MAX_QUEUE) if only is None or only in h["name"]]
    if not heavies:
        raise SystemExit(f"no heavy request type's name contains {only!r}")
    with (tmp / "server.log").open("w") as out:
        server = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "NANOGPT_API_KEYS": f"{HEAVY_KEY},{VICTIM_KEY}"})
    phases: list[dict] = []
    try:
        wait_until_serving(url, 1, server)
        # The first requests of a fresh server pay for allocations no later request sees.
        for _ in range(3):
            httpx.post(url + "/v1/chat/completions", json={"model": "nanogpt", "messages": HEAVY_MESSAGES,
                                                            "max_tokens": 16, "temperature": 0},
                       headers={"Authorization": f"Bearer {VICTIM_KEY}"}, timeout=120).raise_for_status()

        def phase(heavy: dict | None, round_number: int) -> None:
            label = f"phase{len(phases):02d}_{'with' if heavy else 'alone'}"
            phases.append({"round": round_number, **run_phase(url, tmp, label, heavy, heavy_users, seconds)})
            p = phases[-1]
            print(f"  {label}: {p['heavy'] or 'alone'}: victim median {p['victim_median_ms']} ms over "
                  f"{p['victim_requests']} requests ({p['victim_failed']} failed); heavy done {p['heavy_done']}, "
                  f"429 {p['heavy_refused_429']}, 503 {p['heavy_refused_503']}, failed {p['heavy_failed']}",
                  flush=True)

        phase(None, 1)
        for round_number in range(1, rounds + 1):
            for heavy in (heavies if round_number % 2 else heavies[::-1]):
                phase(heavy, round_number)
                phase(None, round_number)
    finally:
        stop_server(server)
    return {"shape": shape_name, "shape_config": vars(shape), "settings": settings, "heavy_users": heavy_users,
            "seconds_per_phase": seconds, "head_start_s": HEAD_START_S, "rounds": rounds,
            "requests": [{"name": h["name"], "path": h["path"]} for h in heavies],
            "phases": phases, "rows": heavy_rows(phases)}


def print_heavy_table(run: dict) -> None:
    print(f"| heavy request ({run['heavy_users']} users, one key) | round | victim alone before | with | alone after "
          f"| with / alone | heavy done (median s) | 429 | 503 | heavy failed | victim failed "
          f"| /health p99 | /health max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in run["rows"]:
        print(f"| {r['heavy']} | {r['round']} | {r['alone_before_ms']:.0f} ms ({r['alone_before_n']}) "
              f"| {r['with_ms']:.0f} ms ({r['with_n']}) | {r['alone_after_ms']:.0f} ms ({r['alone_after_n']}) "
              f"| **{r['ratio']:.2f}x** | {r['heavy_done']} ({r['heavy_median_s']:.1f}) | {r['heavy_refused_429']} "
              f"| {r['heavy_refused_503']} | {r['heavy_failed']} | {r['victim_failed']} "
              f"| {r['health_p99_ms']:.0f} ms | {r['health_max_ms']:.0f} ms |")
    goal_rows = [r for r in run["rows"] if r["goal"]]
    worst = max((r["ratio"] for r in goal_rows), default=float("nan"))
    failed = sum(p["victim_failed"] for p in run["phases"])
    short = [p["victim_tokens_min"] for p in run["phases"] if p["victim_tokens_min"] not in (None, 16)]
    print(f"\nvictim: median latency of a 16-token greedy chat request (requests in the phase in brackets); "
          f"alone = median over the phases before and after. Goal at most 3x alone in every row of a valid "
          f"request ({len(goal_rows)} of {len(run['rows'])} rows): "
          f"{'met' if worst <= 3 else 'NOT met'} (worst {worst:.2f}x); victim failures {failed}"
          + (f"; some victim answers were shorter than 16 tokens (min {min(short)})" if short else ""))
    for p in run["phases"]:
        if p["locust_failures"]:
            print(f"{p['label']}: {p['locust_failures']}")


def heavy_main(args: argparse.Namespace) -> None:
    seconds = args.seconds or 20
    commit = git_commit()
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; commit {commit}; "
          f"shape {args.shape} ({SHAPES[args.shape]}), random weights; one `python -m serving`, max batch "
          f"{MAX_BATCH}, max queue {MAX_QUEUE}, 2 API keys; {args.heavy_users} heavy users, {seconds} s per phase "
          f"(+{HEAD_START_S} s head start for the heavy load), {args.rounds} round(s); locust on the same cores",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="serve_heavy_") as tmp:
        run = measure_heavy(args.shape, args.heavy_users, seconds, args.rounds, Path(tmp), args.only)
    print()
    print_heavy_table(run)
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                         "commit": commit, **run}, indent=2))


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
    parser.add_argument("--seconds", type=int, default=None,
                        help="length of the run per server (default 60), or of each phase with --heavy (default 20)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat both servers, in ABBA order, to see how much the machine drifts; with "
                             "--heavy, repeat every heavy request type, in reverse order every other round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--heavy", action="store_true",
                        help="instead: another caller's short request, alone and while heavy but valid requests run")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="model shape for --heavy")
    parser.add_argument("--heavy-users", type=int, default=2, help="users sending the heavy request, with --heavy")
    parser.add_argument("--only", help="with --heavy: only the heavy request types whose name contains this")
    args = parser.parse_args()
    if args.heavy:
        heavy_main(args)
        return
    args.seconds = args.seconds or 60
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
