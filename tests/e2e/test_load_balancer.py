"""End to end: the worker as a load-balancing endpoint's HTTP server, over loopback.

One worker (ENDPOINT_TYPE=load_balancer, vLLM's CPU build, the tiny model) serves the
module; its last test stops it with SIGTERM. A second one is started to have its engine
killed. The tiny model's weights are random: the tests check shapes, counts and states.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from bench import load_balancer
from bench.inprocess import Clock, Plan
from bench.report import format_http

from helpers import ENDLESS_TOKENS, LONG_CONTEXT_ENV, engine_core
from lb_worker import LBWorker, start_lb_worker

CONCURRENCY = 200
SECRET = "SECRET-PROMPT-TEXT-4b1d"  # must never reach the worker's log
WAIT_S = 120.0  # the most any state here is waited for (it comes in seconds)
SETTINGS = {
    **LONG_CONTEXT_ENV,  # endless requests
    # 200 endless requests for seconds (a few hundred tokens each), never preempted.
    "KV_CACHE_MEMORY_BYTES": str(512 * 1024 * 1024),
    "MAX_CONCURRENCY": str(CONCURRENCY),
    "MAX_REQUEST_BYTES": "100000",
    "SHUTDOWN_GRACE_SECONDS": "600",  # the SIGTERM test ends the drain with a second signal
    "STREAM_MIN_INTERVAL_MS": "0",
    "SERVED_MODEL_NAME": "tiny",
}


@pytest.fixture(scope="module")
def worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LBWorker]:
    workdir = tmp_path_factory.mktemp("load-balancer")
    with start_lb_worker({**worker_env, **SETTINGS}, workdir) as server:
        yield server


@pytest.fixture(scope="module")
def client(worker: LBWorker) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S
    )


def until(predicate: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def native(prompt: str, **sampling: Any) -> dict[str, Any]:
    return {"input": {"prompt": prompt, "sampling_params": sampling}}


def sse_data(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_health_answers_204_from_the_start_then_200(worker: LBWorker) -> None:
    # Before the first answer, nothing listened (0); then "initializing" until the
    # engine served: never an error RunPod would read as unhealthy.
    seen = [status for status in worker.pings if status != 0]
    assert seen == [204, 200], worker.pings
    log = worker.process.log()
    # The server listened before vLLM was imported (vLLM's first log line).
    assert log.index("HTTP server listening") < log.index("vllm.")


def test_the_openai_client_chats_and_completes_streamed_and_not(
    client: openai.OpenAI,
) -> None:
    assert [model.id for model in client.models.list().data] == ["tiny"]
    messages: Any = [{"role": "user", "content": "Name a river."}]
    greedy: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    chat = client.chat.completions.create(model="tiny", messages=messages, **greedy)
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    pieces, reasons = [], []
    for event in client.chat.completions.create(
        model="tiny", messages=messages, stream=True, **greedy
    ):
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == chat.choices[0].message.content
    assert reasons[-1] == "length"

    completion = client.completions.create(model="tiny", prompt="Once", **greedy)
    streamed = "".join(
        choice.text
        for event in client.completions.create(model="tiny", prompt="Once", stream=True, **greedy)
        for choice in event.choices
    )
    assert streamed == completion.choices[0].text


def test_the_anthropic_api_and_tokenization_are_served(worker: LBWorker) -> None:
    claude = anthropic.Anthropic(
        base_url=worker.url, auth_token="unused", max_retries=0, timeout=WAIT_S
    )
    question: Any = [{"role": "user", "content": "Name a river."}]
    answer = claude.messages.create(model="tiny", max_tokens=5, messages=question)
    # The random model may end by itself before max_tokens.
    assert answer.stop_reason in ("max_tokens", "end_turn")
    assert 1 <= answer.usage.output_tokens <= 5
    counted = claude.messages.count_tokens(model="tiny", messages=question)
    assert counted.input_tokens == answer.usage.input_tokens
    with claude.messages.stream(model="tiny", max_tokens=5, messages=question) as stream:
        events = [event.type for event in stream]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    for path in ("/tokenize", "/v1/tokenize"):
        body = {"model": "tiny", "prompt": "hi"}
        tokens = httpx.post(worker.url + path, json=body, timeout=WAIT_S)
        assert tokens.status_code == 200 and tokens.json()["count"] >= 1


def test_the_native_route_streams_server_sent_events_to_curl(worker: LBWorker) -> None:
    body = native("Once upon a time", n=2, max_tokens=12, ignore_eos=True)
    curl = ["curl", "-sS", "-N", "--max-time", str(WAIT_S), "-H", "content-type: application/json"]
    result = subprocess.run(
        [*curl, "-d", json.dumps(body), f"{worker.url}/generate"],
        capture_output=True,
        text=True,
        timeout=WAIT_S + 10,
        check=True,
    )
    chunks = sse_data(result.stdout)
    assert len(chunks) >= 2, result.stdout
    for before, after in itertools.pairwise(chunks):  # cumulative text
        assert all(
            b.startswith(a) or not a for a, b in zip(before["text"], after["text"], strict=True)
        )
    final = chunks[-1]
    assert final["finish_reason"] == ["length", "length"]
    assert final["usage"]["completion_tokens"] == 24
    assert set(final["metrics"]) >= {"time_to_first_token_ms", "tokens_per_s"}

    single = httpx.post(
        f"{worker.url}/generate",
        json={"input": {**body["input"], "stream": False}},
        timeout=WAIT_S,
    )
    assert single.status_code == 200
    assert single.json()["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/generate", b'{"input": {"prompt": "' + SECRET.encode(), 400, "body: not valid JSON"),
        (
            "/generate",
            {"input": {"prompt": SECRET, "temprature": 1}},
            400,
            "temprature: unknown field",
        ),
        (
            "/generate",
            {"input": {"prompt": SECRET, "sampling_params": {"temperature": 9}}},
            400,
            "sampling_params.temperature: Input should be less than or equal to 2",
        ),
        ("/generate", {"input": {"prompt": SECRET}, "webhook": "x"}, 400, "webhook: unknown field"),
        ("/generate", {"input": {"prompt": "x" * 150_000}}, 413, "MAX_REQUEST_BYTES"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": SECRET}], "n": 99},
            400,
            "n: must be at most 16 (MAX_N)",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": SECRET}], "temprature": 1},
            400,
            "temprature: unknown field",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": SECRET, "max_tokens": -1},
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            b'{"model": "tiny", "prompt": "' + SECRET.encode(),
            400,
            "body: not valid JSON (Unterminated string",
        ),
    ],
    ids=[
        "bad json",
        "unknown field",
        "out of range",
        "unknown top field",
        "too large",
        "openai n",
        "openai unknown field",
        "openai range",
        "openai bad json",
    ],
)
def test_a_bad_request_gets_a_one_line_4xx_and_the_server_serves_on(
    worker: LBWorker, path: str, body: Any, status: int, says: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = httpx.post(
        worker.url + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=WAIT_S,
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["code"] == status, error
    assert "\n" not in error["message"] and SECRET not in error["message"], error
    ok = httpx.post(f"{worker.url}/generate", json=native("x", max_tokens=2), timeout=WAIT_S)
    assert ok.status_code == 200
    assert SECRET not in worker.process.log()


def test_200_concurrent_streams_all_complete_none_lost_or_mixed(worker: LBWorker) -> None:
    async def one(client: openai.AsyncOpenAI, number: int) -> tuple[str, str | None]:
        text, reason = "", None
        stream = await client.completions.create(
            model="tiny",
            prompt=f"Request {number} says",
            max_tokens=8,
            stream=True,
            echo=True,
            extra_body={"ignore_eos": True},
        )
        async for event in stream:
            for choice in event.choices:
                text += choice.text
                reason = choice.finish_reason or reason
        return text, reason

    async def all_of_them() -> list[tuple[str, str | None]]:
        client = openai.AsyncOpenAI(
            base_url=f"{worker.url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=WAIT_S,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=CONCURRENCY)
            ),
        )
        async with client:
            return await asyncio.gather(*(one(client, number) for number in range(CONCURRENCY)))

    results = asyncio.run(all_of_them())
    for number, (text, reason) in enumerate(results):
        # Each stream carries its own prompt (echo) and ends as asked.
        assert text.startswith(f"Request {number} says"), (number, text)
        assert reason == "length", (number, reason)
    assert worker.metric("vllm_worker_requests_in_flight") == 0


def test_over_capacity_is_a_429_and_a_client_that_leaves_aborts_its_request(
    worker: LBWorker,
) -> None:
    finished_before = worker.metric("vllm:request_success_total")

    async def scenario() -> httpx.Response:
        limits = httpx.Limits(max_connections=CONCURRENCY + 10)
        async with httpx.AsyncClient(base_url=worker.url, timeout=WAIT_S, limits=limits) as http:
            streams = []
            for number in range(CONCURRENCY):
                body = native(f"Endless {number}", max_tokens=ENDLESS_TOKENS, ignore_eos=True)
                streams.append(http.stream("POST", "/generate", json=body))
            responses = await asyncio.gather(*(stream.__aenter__() for stream in streams))
            # Every one is in flight and generating: its first event came.
            firsts = [response.aiter_lines() for response in responses]
            await asyncio.gather(*(anext(lines) for lines in firsts))
            refused = await http.post("/generate", json=native("one more", max_tokens=2))
            health = await http.get("/ping")
            assert health.status_code == 200  # full, not unhealthy
            for stream in streams:  # the clients leave
                await stream.__aexit__(None, None, None)
            return refused

    refused = asyncio.run(scenario())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "MAX_CONCURRENCY=200" in refused.json()["error"]["message"]
    # In the engine: nothing runs or waits any more, and none of them finished.
    until(
        lambda: (
            worker.metric("vllm:num_requests_running") + worker.metric("vllm:num_requests_waiting")
            == 0
        ),
        "the engine aborted the 200 requests",
    )
    assert worker.metric("vllm:request_success_total") == finished_before
    assert worker.process.log().count("aborted after") >= CONCURRENCY
    assert worker.metric("vllm_worker_requests_refused_total") >= 1


def test_a_client_that_leaves_a_route_of_vllm_or_a_native_request_aborts_it(
    worker: LBWorker, client: openai.OpenAI
) -> None:
    finished_before = worker.metric("vllm:request_success_total")
    endless: dict[str, Any] = {"max_tokens": ENDLESS_TOKENS, "extra_body": {"ignore_eos": True}}
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], stream=True, **endless
    )
    next(iter(stream))
    until(lambda: worker.metric("vllm:num_requests_running") == 1, "the stream runs")
    stream.close()
    until(lambda: worker.metric("vllm:num_requests_running") == 0, "the engine aborted it")
    # Not streamed, vLLM's route then the native one: each seen running, then abandoned.
    native_body = native("x", max_tokens=ENDLESS_TOKENS, ignore_eos=True)
    native_body["input"]["stream"] = False
    aborts = worker.process.log().count("aborted after")
    for path, body in (
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", **endless["extra_body"], "max_tokens": ENDLESS_TOKENS},
        ),
        ("/generate", native_body),
    ):
        asyncio.run(abandoned_once_running(worker, path, body))
        until(lambda: worker.metric("vllm:num_requests_running") == 0, "the engine aborted it")
    # The native request's abort, in the worker's log (vLLM's route logs none).
    until(
        lambda: worker.process.log().count("aborted after") == aborts + 1,
        "the engine aborted it (the worker's log)",
    )
    assert worker.metric("vllm:request_success_total") == finished_before


async def abandoned_once_running(worker: LBWorker, path: str, body: dict[str, Any]) -> None:
    """Send a request that cannot end by itself, and leave once vLLM runs it."""
    async with httpx.AsyncClient(base_url=worker.url, timeout=WAIT_S) as http:
        request = asyncio.create_task(http.post(path, json=body))
        while await asyncio.to_thread(worker.metric, "vllm:num_requests_running") != 1:
            assert not request.done(), request.result().text
            await asyncio.sleep(0.05)
        request.cancel()  # the connection is closed: the client left
        with contextlib.suppress(asyncio.CancelledError):
            await request


def test_the_benchmarks_clients_measure_this_server(worker: LBWorker) -> None:
    """``python -m bench --load-balancer``'s clients (bench/load_balancer.py), against this
    module's server instead of one of its own: errors only, never speed."""
    plan = Plan(
        concurrency=(1, 2),
        max_tokens=4,
        repeats=1,
        min_jobs=2,
        default_clock=Clock.default(),
        bytes_max_tokens=4,
        bytes_growths=(),
    )
    rows = asyncio.run(load_balancer.run_grid(worker.url, plan, [], model="tiny"))
    assert {(row["mode"], row["concurrency"]) for row in rows} == {
        (mode, concurrency) for mode in load_balancer.MODES for concurrency in (1, 2)
    }
    for row in rows:
        assert row["tokens"] == row["jobs"] * 4 and row["tokens_per_s"] > 0
        assert row["ttft_ms"]["p50"] > 0 and row["vs_raw"] is None  # no raw rows here
    table = format_http(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("mode")


def test_metrics_show_vllm_and_the_worker(worker: LBWorker) -> None:
    text = httpx.get(f"{worker.url}/metrics", timeout=WAIT_S).text
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm_worker_requests_in_flight",
        'vllm_worker_requests_total{status="200"}',
        'vllm_worker_requests_refused_total{reason="full"}',
        'vllm_worker_phase{vllm_worker_phase="serving"} 1.0',
    ):
        assert name in text, name


def test_sigterm_refuses_new_requests_lets_those_in_flight_finish_and_exits_0(
    worker: LBWorker,
) -> None:
    """The module's last test: it stops the worker."""
    proc = worker.process.proc
    assert proc is not None

    async def until_async(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not await predicate():
            assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[list[Any], list[str]]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=WAIT_S) as http:
            finite = http.stream(
                "POST", "/generate", json=native("a", n=4, max_tokens=400, ignore_eos=True)
            )
            endless = http.stream(
                "POST", "/generate", json=native("b", max_tokens=ENDLESS_TOKENS, ignore_eos=True)
            )
            finite_response = await finite.__aenter__()
            endless_response = await endless.__aenter__()
            finite_lines = finite_response.aiter_lines()
            endless_lines = endless_response.aiter_lines()
            await anext(finite_lines)
            await anext(endless_lines)
            os.kill(proc.pid, signal.SIGTERM)  # the worker only, as docker stop does

            async def unhealthy() -> bool:
                return (await http.get("/ping")).status_code == 503

            await until_async(unhealthy, "the health check says draining")
            refused = await http.post("/generate", json=native("c", max_tokens=2))
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            assert "shutting down" in refused.json()["error"]["message"]
            # The engine goes on generating for the requests in flight (the endless one
            # cannot have ended).
            generated = worker.metric("vllm:generation_tokens_total")

            async def generating() -> bool:
                return (
                    await asyncio.to_thread(worker.metric, "vllm:generation_tokens_total")
                    > generated
                )

            await until_async(generating, "tokens generated while draining")
            rest = [line async for line in finite_lines]  # it finishes while draining
            # A second signal stops at once: the endless request is cut off.
            os.kill(proc.pid, signal.SIGTERM)
            endless_rest: list[str] = []
            with contextlib.suppress(httpx.HTTPError):  # the connection cut mid-stream
                async for line in endless_lines:
                    endless_rest.append(line)
            await finite.__aexit__(None, None, None)
            return sse_data("\n".join(rest)), endless_rest

    chunks, endless_rest = asyncio.run(scenario())
    assert chunks[-1]["finish_reason"] == ["length"] * 4
    assert not any("finish_reason" in line for line in endless_rest)  # never finished
    assert proc.wait(WAIT_S) == 0
    log = worker.process.log()
    assert "cutting off 1 requests in flight" in log
    assert "exiting with code 0" in log


def test_a_dead_engine_turns_health_to_503_fails_requests_and_exits_1(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    with start_lb_worker({**worker_env, **SETTINGS}, tmp_path) as server:
        proc = server.process.proc
        assert proc is not None
        body = json.dumps(native("x", max_tokens=ENDLESS_TOKENS, ignore_eos=True))
        with httpx.stream(
            "POST",
            f"{server.url}/generate",
            content=body,
            timeout=WAIT_S,
            headers={"content-type": "application/json"},
        ) as stream:
            lines = stream.iter_lines()
            next(lines)
            os.kill(engine_core(proc.pid), signal.SIGKILL)
            # Every request refused; it exits once a health check has seen it unhealthy.
            answers: list[httpx.Response] = []

            def refused() -> bool:
                answer = httpx.post(
                    f"{server.url}/generate", json=native("y", max_tokens=2), timeout=WAIT_S
                )
                answers.append(answer)
                return answer.status_code == 503

            until(refused, "new requests get 503")
            assert proc.poll() is None  # still there: no health check has asked yet
            assert server.ping() == 503
            rest = "\n".join(lines)
        assert "engine stopped" in answers[-1].json()["error"]["message"]
        # The request in flight ends with an error event.
        assert "event: error" in rest
        assert "the engine stopped (its process died)" in rest
        assert proc.wait(WAIT_S) == 1
