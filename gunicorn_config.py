"""Gunicorn settings for serving in production with uvicorn workers.

    NANOGPT_MANIFEST=/srv/artifacts/deployment/current.json NANOGPT_API_KEYS=sk-... \\
    NANOGPT_BIND=0.0.0.0:5001 gunicorn --config gunicorn_config.py serving.app:app

(the app argument may be left out: it defaults to `serving.app:app`).

Gunicorn supervises the workers (restarts one that dies, rotates them on SIGHUP, drains them
on SIGTERM); each worker is a uvicorn event loop with its own copy of the model and its own
engine, so memory grows with the worker count and the CPU cores are split between the
workers. Everything else is configured through the same NANOGPT_* variables as
`python -m serving` (see docs/DEPLOYMENT.md), plus:

    NANOGPT_BIND               address to listen on (127.0.0.1:5001)
    NANOGPT_WORKERS            worker processes (one per core, at most 4)
    NANOGPT_GRACEFUL_TIMEOUT   whole seconds a stopping worker gets to finish its streams (30)
    PROMETHEUS_MULTIPROC_DIR   where the workers' metrics meet (a folder in the temp dir)
"""

import os
import shutil
import tempfile
from pathlib import Path

# prometheus_client picks its storage when it is first imported, and the workers are forked
# from this process: the folder must be in the environment before anything imports it. The
# master's pid keeps the folder the same when SIGHUP re-reads this file.
_OWN_METRICS_DIR = Path(tempfile.gettempdir()) / f"nanogpt-metrics-{os.getpid()}"
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_OWN_METRICS_DIR))
METRICS_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])

from serving.settings import (DEFAULT_PORT, SettingsError, is_loopback, parse_key_list,  # noqa: E402
                              settings_from_environment)

_MOST_DEFAULT_WORKERS = 4  # each worker holds a model and its KV cache; more is a choice, not a default


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _positive_from_environment(name: str, kind: type, default):
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise SystemExit(f"gunicorn_config: {name}={raw!r} is not a positive {kind.__name__}")
    return value


bind = [os.environ.get("NANOGPT_BIND", f"127.0.0.1:{DEFAULT_PORT}")]
workers = _positive_from_environment("NANOGPT_WORKERS", int,
                                     max(1, min(_available_cores(), _MOST_DEFAULT_WORKERS)))
# Drains in-flight streams on shutdown and on SIGHUP within graceful_timeout (serving/drain.py).
worker_class = "serving.gunicorn_worker.DrainingUvicornWorker"
# Each worker builds the app (and loads the model) after the fork, in its lifespan: torch's
# thread pools and the engine thread do not survive a fork, so the app is never preloaded.
wsgi_app = "serving.app:app"
preload_app = False
# Loading a large checkpoint takes a while; the worker must not be killed for it. For
# uvicorn workers this is a heartbeat timeout, not a limit on how long a request may stream.
timeout = 120
graceful_timeout = _positive_from_environment("NANOGPT_GRACEFUL_TIMEOUT", int, 30)
keepalive = 5
# Gunicorn's own default believes X-Forwarded-For from 127.0.0.1 and ::1 (or $FORWARDED_ALLOW_IPS),
# and the uvicorn worker passes it on: any local process could then claim a new address per
# request and escape the per-address limits. Only the proxies named here are believed; none by
# default (checked with the other settings below, and the worker then skips the header entirely).
forwarded_allow_ips = ",".join(parse_key_list(os.environ.get("NANOGPT_FORWARDED_ALLOW_IPS")))
accesslog = "-"
errorlog = "-"
# Gunicorn's control socket sits at one path per user, which a second server on the machine
# would take over; signals (HUP, TERM, TTIN/TTOU) are the interface documented here.
control_socket_disable = True

# Split the cores between workers unless told otherwise.
os.environ.setdefault("NANOGPT_THREADS", str(max(1, _available_cores() // workers)))


def on_starting(server) -> None:
    """Start the metrics from zero: files left by an earlier run would be added to this one's."""
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    for stale in METRICS_DIR.glob("*.db"):
        stale.unlink()


def child_exit(server, worker) -> None:
    """Drop a finished worker's live gauges (queue depth, running samples); its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    if METRICS_DIR == _OWN_METRICS_DIR:  # a folder given by the operator is theirs to keep
        shutil.rmtree(METRICS_DIR, ignore_errors=True)


def _check_bind_is_safe() -> None:
    """The same rule as `python -m serving`: no API key, no listening beyond loopback."""
    for address in bind:
        host = address.rsplit(":", 1)[0] if ":" in address and not address.startswith("unix:") else address
        if address.startswith("unix:"):
            continue
        os.environ["NANOGPT_HOST"] = host.strip("[]")
        try:
            settings_from_environment()
        except SettingsError as e:
            raise SystemExit(f"gunicorn_config: {e}") from None
        if not is_loopback(host.strip("[]")):
            print(f"gunicorn_config: listening on {address} with API keys required")


_check_bind_is_safe()
