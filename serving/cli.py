"""`python -m serving` / `nanogpt-serve`: serve a checkpoint or a deployment manifest over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nanogpt_core.deployment_manifest import DEFAULT_MODEL_ID, ManifestError, read_manifest
from serving.settings import (
    API_KEYS_ENV,
    DEFAULT_PORT,
    LOBECHAT_LOCAL_ORIGINS,
    MIB,
    SINGLE_ROW_LAYOUTS,
    WEIGHT_FORMATS,
    ServerSettings,
    SettingsError,
    collect_api_keys,
    parse_key_list,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanogpt-serve",
        description="OpenAI-compatible API and web chat for a nanogpt-pipeline checkpoint.",
        epilog=f"API keys come from ${API_KEYS_ENV} (comma-separated) and/or --api-key-file. "
               "Without any key the server only listens on a loopback address.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="serve this model_*.pt file")
    source.add_argument("--manifest", type=Path,
                        help="serve the deployment this manifest names, and follow it when it changes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key-file", type=Path, help="a file with one API key per line")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID,
                        help="alias for a bare --checkpoint (a manifest names its own)")
    parser.add_argument("--cors-origins", default=",".join(LOBECHAT_LOCAL_ORIGINS),
                        help="comma-separated origins allowed to call the API from a browser; '' for none, "
                             "'*' for any (default: LobeChat on this machine)")
    parser.add_argument("--allowed-hosts", default="",
                        help="comma-separated Host names answered ('*.example.org', '*' for any); default: "
                             "localhost, 127.0.0.1 and ::1 on a loopback address, any name otherwise")
    parser.add_argument("--max-request-bytes", type=int, default=MIB,
                        help="largest request body accepted (default 1 MiB); larger ones get 413")
    parser.add_argument("--enable-docs", action="store_true",
                        help="serve /docs and /openapi.json (behind the API key, like /v1)")
    parser.add_argument("--key-requests-per-minute", type=int, default=0,
                        help="requests per minute per API key (per client address without keys); 0: no limit")
    parser.add_argument("--key-concurrent-requests", type=int, default=0,
                        help="requests in flight per API key (per client address without keys); 0: no limit")
    parser.add_argument("--rate-limit-storage", default="memory://",
                        help="where requests per minute are counted: memory:// (this process) or "
                             "redis://HOST:PORT/DB (shared by every worker and server using it)")
    parser.add_argument("--rate-limit-namespace", default="nanogpt",
                        help="prefix of the counters in shared storage; servers that share one count together")
    parser.add_argument("--forwarded-allow-ips", default="",
                        help="comma-separated addresses or networks of the reverse proxies in front of the server, "
                             "whose X-Forwarded-For names the client (for per-address limits and logs); default: "
                             "none, the header is ignored. The RFC 7239 Forwarded header is always ignored")
    parser.add_argument("--expose-paths", action="store_true",
                        help="show absolute server paths in /v1/models (default: file names only)")
    parser.add_argument("--metrics-need-key", action="store_true",
                        help="require the API key on /metrics (default: public, like /health)")
    parser.add_argument("--max-batch", type=int, default=8, help="samples decoded together per step")
    parser.add_argument("--max-queue", type=int, default=64, help="completions waiting for a slot before new requests get 503; a quarter of it is one "
                             "caller's share (429 beyond)")
    parser.add_argument("--default-max-tokens", type=int, default=512,
                        help="completion length when a request gives none")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32",
                        help="fp32: the checkpoint's weights as they are; int8: linear and output layers "
                             "quantized per row at load (faster decoding on a CPU, slightly different "
                             "outputs; docs/BENCHMARKS.md)")
    parser.add_argument("--single-row-layout", choices=SINGLE_ROW_LAYOUTS, default="timed",
                        help="fp32: the weight layout one-row products go through; timed: the fastest per "
                             "role of matrix, timed at load (may hold some weights twice); a fixed layout "
                             "other than onednn-batch also holds them twice, onednn-batch never does")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between manifest checks")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds a stopping server (SIGTERM, Ctrl-C) gives running responses before it "
                             "ends them with a final event; as gunicorn's graceful_timeout")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise SettingsError(f"checkpoint {args.checkpoint} does not exist")
    if args.manifest is not None:
        try:
            read_manifest(args.manifest)
        except ManifestError as e:
            raise SettingsError(str(e)) from None
    return ServerSettings(
        checkpoint=args.checkpoint, manifest=args.manifest, host=args.host, port=args.port,
        api_keys=collect_api_keys(args.api_key_file), model_id=args.model_id,
        cors_origins=tuple(parse_key_list(args.cors_origins)),
        allowed_hosts=tuple(parse_key_list(args.allowed_hosts)) or None, max_request_bytes=args.max_request_bytes,
        enable_docs=args.enable_docs, key_requests_per_minute=args.key_requests_per_minute,
        key_concurrent_requests=args.key_concurrent_requests, rate_limit_storage=args.rate_limit_storage,
        rate_limit_namespace=args.rate_limit_namespace,
        forwarded_allow_ips=tuple(parse_key_list(args.forwarded_allow_ips)), expose_paths=args.expose_paths,
        metrics_need_key=args.metrics_need_key, max_batch=args.max_batch,
        max_queue=args.max_queue, default_max_tokens=args.default_max_tokens, threads=args.threads,
        device=args.device, weights=args.weights, single_row_layout=args.single_row_layout,
        poll_interval_s=args.poll_interval)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except SettingsError as e:
        sys.exit(f"nanogpt-serve: {e}")
    if not settings.requires_auth:
        print(f"nanogpt-serve: no API key configured, so the API is open: listening on {settings.host} "
              f"(loopback) only. Set {API_KEYS_ENV} or --api-key-file to serve other hosts.",
              file=sys.stderr, flush=True)

    import uvicorn

    from serving.app import create_app
    from serving.drain import ACCEPTED_REQUESTS_READ_S, Drain, DrainingServer, DrainMiddleware, shutdown_deadlines

    # The same drain as a gunicorn worker's: streams still running near the deadline end with a
    # final error event and [DONE] rather than being cut mid-event when uvicorn gives up.
    try:
        drain_s, hard_s = shutdown_deadlines(args.graceful_timeout)
    except ValueError as e:
        sys.exit(f"nanogpt-serve: --graceful-timeout: {e}")
    drain = Drain(drain_s)
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise (and FORWARDED_ALLOW_IPS
    # from the environment); here only the proxies the operator named are believed.
    config = uvicorn.Config(DrainMiddleware(create_app(settings), drain), host=settings.host, port=settings.port,
                            log_level=args.log_level, lifespan="on",
                            proxy_headers=bool(settings.forwarded_allow_ips),
                            forwarded_allow_ips=list(settings.forwarded_allow_ips),
                            timeout_graceful_shutdown=max(0.0, hard_s - ACCEPTED_REQUESTS_READ_S))
    DrainingServer(config, drain).run()


if __name__ == "__main__":
    main()
