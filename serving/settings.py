"""The server's typed configuration, from the command line or from `NANOGPT_*` environment variables.

The environment route exists for process managers that import the app themselves
(`uvicorn --factory serving.app:app_from_environment`, gunicorn with `gunicorn_config.py`).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from serving.manifest import DEFAULT_MODEL_ID

API_KEYS_ENV = "NANOGPT_API_KEYS"
API_KEY_FILE_ENV = "NANOGPT_API_KEY_FILE"


class SettingsError(ValueError):
    """A configuration the server refuses to start with."""


@dataclass(frozen=True)
class ServerSettings:
    checkpoint: Path | None = None
    manifest: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    model_id: str = DEFAULT_MODEL_ID  # alias served when a bare checkpoint is given
    cors_origins: tuple[str, ...] = ("*",)
    max_batch: int = 8  # samples decoded together per step
    max_queue: int = 64  # requests waiting for a slot before new ones get 503
    prefill_chunk: int = 256  # prompt tokens processed between two decode steps
    default_max_tokens: int = 512  # completion limit when a request names none
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    device: str = "cpu"
    poll_interval_s: float = 1.0  # how often the manifest is checked for a new deployment

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.manifest is None):
            raise SettingsError("give exactly one of a checkpoint or a deployment manifest")
        for name in ("max_batch", "max_queue", "prefill_chunk", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.poll_interval_s <= 0:
            raise SettingsError("poll_interval_s must be positive")
        if not self.api_keys and not is_loopback(self.host):
            raise SettingsError(
                f"refusing to listen on {self.host} without an API key: set {API_KEYS_ENV} (comma-separated) "
                f"or give a key file (--api-key-file or {API_KEY_FILE_ENV}), "
                "or listen on a loopback address such as 127.0.0.1")

    @property
    def requires_auth(self) -> bool:
        return bool(self.api_keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_key_list(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def read_key_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SettingsError(f"cannot read API key file {path}: {e}") from e
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise SettingsError(f"API key file {path} holds no key")
    return keys


def collect_api_keys(key_file: str | Path | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    environ = os.environ if environ is None else environ
    keys = parse_key_list(environ.get(API_KEYS_ENV))
    if key_file:
        keys += read_key_file(key_file)
    return tuple(dict.fromkeys(keys))


def settings_from_environment(environ: dict[str, str] | None = None) -> ServerSettings:
    """Settings from NANOGPT_CHECKPOINT or NANOGPT_MANIFEST and the optional NANOGPT_* knobs."""
    env = os.environ if environ is None else environ

    def number(name: str, kind: type, default):
        raw = env.get(name)
        if raw in (None, ""):
            return default
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

    checkpoint = env.get("NANOGPT_CHECKPOINT") or None
    manifest = env.get("NANOGPT_MANIFEST") or None
    return ServerSettings(
        checkpoint=Path(checkpoint) if checkpoint else None,
        manifest=Path(manifest) if manifest else None,
        host=env.get("NANOGPT_HOST", "127.0.0.1"),
        port=number("NANOGPT_PORT", int, 8000),
        api_keys=collect_api_keys(env.get(API_KEY_FILE_ENV), env),
        model_id=env.get("NANOGPT_MODEL_ID", DEFAULT_MODEL_ID),
        cors_origins=tuple(parse_key_list(env.get("NANOGPT_CORS_ORIGINS", "*"))),
        max_batch=number("NANOGPT_MAX_BATCH", int, 8),
        max_queue=number("NANOGPT_MAX_QUEUE", int, 64),
        default_max_tokens=number("NANOGPT_DEFAULT_MAX_TOKENS", int, 512),
        threads=number("NANOGPT_THREADS", int, None),
        device=env.get("NANOGPT_DEVICE", "cpu"),
        poll_interval_s=number("NANOGPT_POLL_INTERVAL", float, 1.0),
    )
