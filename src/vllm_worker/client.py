"""A client for a RunPod queue endpoint running this worker (RunPod's cloud or the local one).

Library::

    client = EndpointClient("https://api.runpod.ai/v2/<endpoint_id>", api_key="...")
    for delta in client.stream_text({"prompt": "Hello", "sampling_params": {"max_tokens": 64}}):
        print(delta.text, end="")

Command line (prints the text as it arrives, usage at the end; Ctrl-C cancels the job)::

    python -m vllm_worker.client --url http://127.0.0.1:8000/v2/local --prompt "Hello"

Only the standard library is used, so the client runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TERMINAL_FAILURES = {"FAILED", "CANCELLED", "TIMED_OUT"}
RUNNING = {"IN_QUEUE", "IN_PROGRESS"}


class EndpointError(Exception):
    """The endpoint refused a request, or the job did not complete."""


@dataclass(frozen=True)
class TextDelta:
    """New text of one sequence."""

    index: int
    text: str


@dataclass
class DeltaTracker:
    """Turns the worker's chunks into per-sequence text deltas, whatever the stream mode.

    Cumulative chunks repeat all text so far: the delta is what extends the previous
    text. Delta chunks (``stream_mode: "delta"``) already are deltas.
    """

    cumulative: bool = True
    texts: dict[int, str] = field(default_factory=dict)
    final: dict[str, Any] | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[TextDelta]:
        deltas = []
        for index, text in enumerate(chunk.get("text", [])):
            previous = self.texts.get(index, "")
            new = text[len(previous) :] if self.cumulative else text
            self.texts[index] = previous + new
            if new:
                deltas.append(TextDelta(index, new))
        if "usage" in chunk:
            self.final = dict(chunk)
        return deltas


class EndpointClient:
    """RunPod's queue API: /run, /runsync, /status, /stream, /cancel."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s

    def submit(self, job_input: Mapping[str, Any]) -> str:
        return str(self._call("POST", "/run", {"input": job_input})["id"])

    def run_sync(self, job_input: Mapping[str, Any], wait_ms: int = 90_000) -> dict[str, Any]:
        return self._call("POST", f"/runsync?wait={wait_ms}", {"input": job_input})

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/status/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/cancel/{job_id}")

    def stream(
        self, job_id: str, poll_interval_s: float = 0.1, deadline_s: float = 3600
    ) -> Iterator[dict[str, Any]]:
        """Yield each chunk of the job as ``/stream`` delivers it, until the job ends."""
        give_up_at = time.monotonic() + deadline_s
        while time.monotonic() < give_up_at:
            reply = self._call("GET", f"/stream/{job_id}")
            for item in reply.get("stream", []):
                yield item["output"]
            status = reply.get("status")
            if status in TERMINAL_FAILURES:
                error = reply.get("error") or self.status(job_id).get("error") or status
                raise EndpointError(f"job {job_id} {status}: {error}")
            if status not in RUNNING:
                return
            if not reply.get("stream"):
                time.sleep(poll_interval_s)
        raise EndpointError(f"job {job_id} still running after {deadline_s:.0f} s")

    def stream_text(self, job_input: Mapping[str, Any]) -> Iterator[TextDelta]:
        """Submit a job and yield its text deltas; the job is cancelled if iteration stops."""
        job_id = self.submit(job_input)
        tracker = DeltaTracker(cumulative=job_input.get("stream_mode", "cumulative") != "delta")
        finished = False
        try:
            for chunk in self.stream(job_id):
                yield from tracker.feed(chunk)
            finished = True
        finally:
            if not finished:
                self._cancel_quietly(job_id)

    def _cancel_quietly(self, job_id: str) -> None:
        # Already ended, or the endpoint is gone: nothing is left to stop.
        with contextlib.suppress(EndpointError, OSError):
            self.cancel(job_id)

    def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self._api_key:
            request.add_header("Authorization", self._api_key)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise EndpointError(f"{method} {path}: HTTP {error.code}: {detail}") from None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    args = _parse_args(argv, environ)
    job_input = json.loads(args.input) if args.input else _input_from_flags(args)
    client = EndpointClient(args.url, api_key=args.api_key)
    if args.sync:
        print(json.dumps(client.run_sync(job_input), ensure_ascii=False, indent=2))
        return 0
    job_id = client.submit(job_input)
    print(f"job {job_id}", file=sys.stderr)
    tracker = DeltaTracker(cumulative=job_input.get("stream_mode", "cumulative") != "delta")
    try:
        _print_deltas(tracker, client.stream(job_id))
    except KeyboardInterrupt:
        client.cancel(job_id)
        print(f"\njob {job_id} cancelled", file=sys.stderr)
        return 130
    except EndpointError as error:
        print(f"\n{error}", file=sys.stderr)
        return 1
    if tracker.final is not None:
        print(
            f"\nfinish_reason={tracker.final['finish_reason']} usage={tracker.final['usage']}",
            file=sys.stderr,
        )
    return 0


def _print_deltas(tracker: DeltaTracker, chunks: Iterable[Mapping[str, Any]]) -> None:
    """Sequence 0 is printed as it arrives; the others (n > 1) in full at the end."""
    for chunk in chunks:
        for delta in tracker.feed(chunk):
            if delta.index == 0:
                print(delta.text, end="", flush=True)
    for index, text in sorted(tracker.texts.items()):
        if index > 0:
            print(f"\n--- sequence {index} ---\n{text}", end="")
    print()


def _input_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    sampling: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.n != 1:
        sampling["n"] = args.n
    return {"prompt": args.prompt, "sampling_params": sampling, "echo": args.echo}


def _parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stream a completion from a RunPod endpoint.")
    parser.add_argument(
        "--url",
        required=True,
        help="endpoint base URL, e.g. https://api.runpod.ai/v2/<endpoint_id>",
    )
    parser.add_argument(
        "--api-key",
        default=environ.get("RUNPOD_API_KEY"),
        help="RunPod API key (default: $RUNPOD_API_KEY)",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt to complete")
    what.add_argument("--input", help="a full job input as JSON: '{\"prompt\": ..., ...}'")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("-n", type=int, default=1, help="completions to generate")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the text")
    parser.add_argument("--sync", action="store_true", help="use /runsync: one reply, no stream")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
