"""Gunicorn settings for serving in production with uvicorn workers.

    NANOGPT_MANIFEST=/srv/artifacts/deployment/current.json NANOGPT_API_KEYS=sk-... \\
    NANOGPT_BIND=0.0.0.0:8000 gunicorn -c gunicorn_config.py

Gunicorn supervises the workers (restarts one that dies, rotates them on SIGHUP); each
worker is a uvicorn event loop with its own copy of the model and its own engine, so
memory grows with the worker count and the CPU cores are split between the workers.
Everything else is configured through the same NANOGPT_* variables as `python -m serving`
(see docs/DEPLOYMENT.md).
"""

import os

from serving.settings import SettingsError, is_loopback, settings_from_environment

bind = [os.environ.get("NANOGPT_BIND", "127.0.0.1:8000")]
workers = int(os.environ.get("NANOGPT_WORKERS", "1"))
worker_class = "uvicorn_worker.UvicornWorker"
# Each worker builds the app (and loads the model) after the fork: torch's thread pools
# and the engine thread do not survive a fork, so the app is never preloaded.
wsgi_app = "serving.app:app_from_environment()"
preload_app = False
# Loading a large checkpoint takes a while; the worker must not be killed for it. For
# uvicorn workers this is a heartbeat timeout, not a limit on how long a request may stream.
timeout = 120
graceful_timeout = 30  # in-flight streams get this long to finish on restart or shutdown
keepalive = 5
accesslog = "-"
errorlog = "-"

# Split the cores between workers unless told otherwise.
os.environ.setdefault("NANOGPT_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, workers))))


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
