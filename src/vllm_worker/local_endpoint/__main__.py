"""``python -m vllm_worker.local_endpoint``: a local RunPod endpoint running this worker.

The worker's settings come from the environment, as on RunPod (MODEL_NAME, DTYPE, ...)::

    MODEL_NAME=$PWD/.cache/tiny-llama DTYPE=float32 ENFORCE_EAGER=true \\
        python -m vllm_worker.local_endpoint
    # then use http://127.0.0.1:8000/v2/local wherever https://api.runpod.ai/v2/<id> was
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from vllm_worker.local_endpoint.context import EndpointConfig
from vllm_worker.local_endpoint.jobs import StoreLimits
from vllm_worker.local_endpoint.process import default_command
from vllm_worker.local_endpoint.server import serve


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_worker.local_endpoint",
        description=(
            "Serve RunPod's queue-endpoint API (/run, /runsync, /status, /stream, /cancel, "
            "/retry, /purge-queue, /health) on this machine, and run the worker behind it "
            "in RunPod's production mode. The worker reads its settings (MODEL_NAME, ...) "
            "from this environment."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--endpoint-id", default="local", help="the <endpoint_id> in the URLs")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LOCAL_ENDPOINT_API_KEY") or None,
        help="require this key in clients' Authorization header (default: "
        "$LOCAL_ENDPOINT_API_KEY; unset: no check)",
    )
    parser.add_argument(
        "--execution-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a job running longer ends TIMED_OUT and the worker stops it (RunPod: 600)",
    )
    parser.add_argument(
        "--retention",
        type=float,
        default=1800.0,
        metavar="S",
        help="how long /run results stay readable (RunPod: 1800)",
    )
    parser.add_argument(
        "--sync-retention",
        type=float,
        default=60.0,
        metavar="S",
        help="how long /runsync results stay readable (RunPod: 60)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--worker-cmd",
        help="command that starts the worker (default: python -u <repo>/src/handler.py)",
    )
    what.add_argument(
        "--no-worker",
        action="store_true",
        help="start no worker; print the environment a separately started one needs",
    )
    parser.add_argument(
        "--worker-stop-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on exit, how long the worker may finish its jobs before it is killed",
    )
    parser.add_argument("--log-level", default="INFO", help="the endpoint's own log level")
    args = parser.parse_args(argv)
    for name in ("execution_timeout", "retention", "sync_retention"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s local-endpoint: %(message)s",
        stream=sys.stderr,
    )
    if args.no_worker:
        command = None
    elif args.worker_cmd:
        command = shlex.split(args.worker_cmd)
    else:
        command = default_command()
    config = EndpointConfig(
        host=args.host,
        port=args.port,
        endpoint_id=args.endpoint_id,
        api_key=args.api_key,
        limits=StoreLimits(
            execution_timeout_s=args.execution_timeout,
            retention_s=args.retention,
            sync_retention_s=args.sync_retention,
        ),
    )
    if args.api_key is None and args.host not in {"127.0.0.1", "localhost", "::1"}:
        logging.warning(
            "listening on %s without --api-key: anyone who reaches it can use it", args.host
        )

    def announce(line: str) -> None:
        print(line, flush=True)

    return asyncio.run(
        serve(
            config,
            worker_command=command,
            environ=os.environ,
            stop_grace_s=args.worker_stop_timeout,
            announce=announce,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
