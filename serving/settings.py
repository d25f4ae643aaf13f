"""The server's typed configuration, from the command line or from `NANOGPT_*` environment variables.

The environment route exists for process managers that import the app themselves
(`uvicorn --factory serving.app:app_from_environment`, gunicorn with `gunicorn_config.py`).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from nanogpt_core.deployment_manifest import DEFAULT_MODEL_ID

API_KEYS_ENV = "NANOGPT_API_KEYS"
API_KEY_FILE_ENV = "NANOGPT_API_KEY_FILE"

# LobeChat's own origins when it runs on this machine, so it works out of the box while an
# arbitrary web page the user happens to visit cannot call a keyless loopback server.
LOBECHAT_LOCAL_ORIGINS = ("http://localhost:3210", "http://127.0.0.1:3210")
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
MIB = 1024 * 1024
DEFAULT_PORT = 5001  # the address the README, the web UI's instructions and LobeChat's setup give
RATE_LIMIT_STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix")
# How the engine holds the linear layers' weights: as trained, or int8 per row (serving.int8).
WEIGHT_FORMATS = ("fp32", "int8")
# The weight layouts an fp32 engine can send one-row products through (serving.linear_layouts);
# "timed" takes the fastest of them for each role of matrix, timed when the model loads.
FLOAT_LAYOUTS = ("onednn-batch", "onednn-one-row", "plain", "transposed")
SINGLE_ROW_LAYOUTS = ("timed", *FLOAT_LAYOUTS)


class SettingsError(ValueError):
    """A configuration the server refuses to start with."""


@dataclass(frozen=True)
class ServerSettings:
    checkpoint: Path | None = None
    manifest: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()
    model_id: str = DEFAULT_MODEL_ID  # alias served when a bare checkpoint is given
    cors_origins: tuple[str, ...] = LOBECHAT_LOCAL_ORIGINS
    # Host header names answered; None: the loopback names when bound to loopback, else any.
    allowed_hosts: tuple[str, ...] | None = None
    max_request_bytes: int = MIB  # request bodies beyond this get 413 before they are parsed
    enable_docs: bool = False  # /docs and /openapi.json (behind the API key like /v1)
    key_requests_per_minute: int = 0  # per API key (per client address without keys); 0: unlimited
    key_concurrent_requests: int = 0  # /v1 requests in flight per API key; 0: unlimited
    rate_limit_storage: str = "memory://"  # `limits` storage URI, e.g. redis://127.0.0.1:6379/0
    rate_limit_namespace: str = "nanogpt"  # prefix of the limiter's keys in shared storage
    # Proxies (IPs or networks) whose X-Forwarded-For names the client; empty: the header is
    # ignored, since per-address limits on a keyless server would otherwise trust any local caller.
    forwarded_allow_ips: tuple[str, ...] = ()
    expose_paths: bool = False  # /v1/models shows absolute server paths, not just file names
    metrics_need_key: bool = False  # /metrics behind the API key like /v1
    max_batch: int = 8  # samples decoded together per step
    max_queue: int = 64  # requests waiting for a slot before new ones get 503
    prefill_chunk: int = 256  # prompt tokens processed between two decode steps
    default_max_tokens: int = 512  # completion limit when a request names none
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    device: str = "cpu"
    weights: str = "fp32"  # one of WEIGHT_FORMATS
    single_row_layout: str = "timed"  # one of SINGLE_ROW_LAYOUTS; a fixed one saves a second copy
    poll_interval_s: float = 1.0  # how often the manifest is checked for a new deployment

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.manifest is None):
            raise SettingsError("give exactly one of a checkpoint or a deployment manifest")
        for name in ("max_batch", "max_queue", "prefill_chunk", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.weights not in WEIGHT_FORMATS:
            raise SettingsError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.weights == "int8" and self.device != "cpu":
            raise SettingsError(f"int8 weights run on the CPU only; the device is {self.device!r}")
        if self.single_row_layout not in SINGLE_ROW_LAYOUTS:
            raise SettingsError(f"single_row_layout must be one of {', '.join(SINGLE_ROW_LAYOUTS)}, "
                                f"got {self.single_row_layout!r}")
        if self.single_row_layout != "timed" and self.weights != "fp32":
            raise SettingsError(f"single_row_layout {self.single_row_layout!r} applies to fp32 weights only, "
                                f"not {self.weights}")
        if self.poll_interval_s <= 0:
            raise SettingsError("poll_interval_s must be positive")
        if self.max_request_bytes < 1:
            raise SettingsError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        for name in ("key_requests_per_minute", "key_concurrent_requests"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be 0 (unlimited) or more, got {getattr(self, name)}")
        for origin in self.cors_origins:
            check_origin(origin)
        for host in self.allowed_hosts or ():
            check_host_pattern(host)
        scheme = self.rate_limit_storage.partition("://")[0]
        if "://" not in self.rate_limit_storage or scheme not in RATE_LIMIT_STORAGE_SCHEMES:
            raise SettingsError(f"rate limit storage {self.rate_limit_storage!r} is not a storage URI this server "
                                f"supports: use memory:// or redis://host:port/db")
        if not self.rate_limit_namespace.strip():
            raise SettingsError("rate_limit_namespace must not be empty")
        for address in self.forwarded_allow_ips:
            check_proxy_address(address)
        if self.metrics_need_key and not self.api_keys:
            raise SettingsError("metrics_need_key asks for the API key on /metrics, but no API key is configured: "
                                f"set {API_KEYS_ENV} or give a key file (--api-key-file or {API_KEY_FILE_ENV})")
        if not self.api_keys and not is_loopback(self.host):
            raise SettingsError(
                f"refusing to listen on {self.host} without an API key: set {API_KEYS_ENV} (comma-separated) "
                f"or give a key file (--api-key-file or {API_KEY_FILE_ENV}), "
                "or listen on a loopback address such as 127.0.0.1")

    @property
    def requires_auth(self) -> bool:
        return bool(self.api_keys)

    @property
    def host_patterns(self) -> tuple[str, ...]:
        """The Host names answered: as configured, else loopback names on loopback and any name elsewhere.

        On loopback the list is what stops DNS rebinding (a page on attacker.example whose name
        now resolves to 127.0.0.1); on a public address keys are required, which a rebound
        page does not have, and the names clients use are not known in advance.
        """
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if is_loopback(self.host):
            return tuple(dict.fromkeys((*LOOPBACK_HOST_NAMES, self.host.strip("[]").lower())))
        return ("*",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_key_list(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def check_origin(origin: str) -> None:
    """An origin as browsers send it: scheme://host[:port], no path, no trailing slash (or '*' for any)."""
    if origin == "*":
        return
    scheme, sep, rest = origin.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
        raise SettingsError(f"CORS origin {origin!r} is not of the form http(s)://host[:port] "
                            "(no path, no trailing slash)")


def check_host_pattern(pattern: str) -> None:
    """A Host name to allow: 'example.org', '*.example.org', an IP address, or '*' for any."""
    if pattern == "*" or _is_ip(pattern):
        return
    name = pattern.removeprefix("*.")
    if not name or any(c in name for c in "/:*@[] "):
        raise SettingsError(f"allowed host {pattern!r} is not a host name (give it without scheme or port; "
                            "'*.example.org' for subdomains, '*' for any)")


def check_proxy_address(address: str) -> None:
    """A proxy to take X-Forwarded-For from: an IP address or a network such as 10.0.0.0/8."""
    try:
        ipaddress.ip_network(address)
    except ValueError:
        raise SettingsError(f"forwarded-allow address {address!r} is not an IP address or network "
                            "(e.g. 127.0.0.1, ::1 or 10.0.0.0/8, with no host bits set after the '/')") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False


def parse_flag(name: str, raw: str | None, default: bool) -> bool:
    if raw in (None, ""):
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no or on/off)")


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
        port=number("NANOGPT_PORT", int, DEFAULT_PORT),
        api_keys=collect_api_keys(env.get(API_KEY_FILE_ENV), env),
        model_id=env.get("NANOGPT_MODEL_ID", DEFAULT_MODEL_ID),
        cors_origins=tuple(parse_key_list(env.get("NANOGPT_CORS_ORIGINS", ",".join(LOBECHAT_LOCAL_ORIGINS)))),
        allowed_hosts=tuple(parse_key_list(env.get("NANOGPT_ALLOWED_HOSTS"))) or None,
        max_request_bytes=number("NANOGPT_MAX_REQUEST_BYTES", int, MIB),
        enable_docs=parse_flag("NANOGPT_ENABLE_DOCS", env.get("NANOGPT_ENABLE_DOCS"), False),
        key_requests_per_minute=number("NANOGPT_KEY_REQUESTS_PER_MINUTE", int, 0),
        key_concurrent_requests=number("NANOGPT_KEY_CONCURRENT_REQUESTS", int, 0),
        rate_limit_storage=env.get("NANOGPT_RATE_LIMIT_STORAGE") or "memory://",
        rate_limit_namespace=env.get("NANOGPT_RATE_LIMIT_NAMESPACE") or "nanogpt",
        forwarded_allow_ips=tuple(parse_key_list(env.get("NANOGPT_FORWARDED_ALLOW_IPS"))),
        expose_paths=parse_flag("NANOGPT_EXPOSE_PATHS", env.get("NANOGPT_EXPOSE_PATHS"), False),
        metrics_need_key=parse_flag("NANOGPT_METRICS_NEED_KEY", env.get("NANOGPT_METRICS_NEED_KEY"), False),
        max_batch=number("NANOGPT_MAX_BATCH", int, 8),
        max_queue=number("NANOGPT_MAX_QUEUE", int, 64),
        default_max_tokens=number("NANOGPT_DEFAULT_MAX_TOKENS", int, 512),
        threads=number("NANOGPT_THREADS", int, None),
        device=env.get("NANOGPT_DEVICE", "cpu"),
        weights=env.get("NANOGPT_WEIGHTS") or "fp32",
        single_row_layout=env.get("NANOGPT_SINGLE_ROW_LAYOUT") or "timed",
        poll_interval_s=number("NANOGPT_POLL_INTERVAL", float, 1.0),
    )
