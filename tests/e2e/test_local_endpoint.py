"""End to end: ``python -m vllm_worker.local_endpoint`` with its real worker, over HTTP.

The endpoint runs as a user runs it: its own process, which starts ``src/handler.py`` in
RunPod's production mode (the runpod SDK's real job loop) on vLLM's CPU build and the
project's tiny model. The tests are RunPod clients: plain ``requests`` calls, the seed
endpoint's own snippet, and the runpod SDK's client, against ``http://127.0.0.1:<port>``.

One endpoint and worker serve the whole module (the engine takes 20-45 s to start).
The last test stops them with SIGTERM; the fixture makes sure nothing outlives it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from endpoint_process import (
    JOB_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EndpointProcess,
    health,
    start_endpoint,
    status,
    submit,
    wait_final,
)
from helpers import ENDLESS_TOKENS, LONG_CONTEXT_ENV, group_members
from vllm_worker.client import DeltaTracker, EndpointClient, EndpointError

SEED_PROMPT = (
    "\nWrite me an essay about how the french revolution impacted the rest of europe over "
    "the 18th century. \n"
)
SEED_FLOW_TOKENS = 2000  # the seed's flow within the tiny model's own 2048 positions
# A job that runs a second or more (4 x 500 tokens), to completion.
LONG_TOKENS = 500
LONG_INPUT = {"n": 4, "max_tokens": LONG_TOKENS, "ignore_eos": True}
LONG_STORY = {"prompt": "A long story:", "sampling_params": LONG_INPUT}
# Jobs that must still run when the test looks, which then cancels them.
ENDLESS_INPUT = {"n": 2, "max_tokens": ENDLESS_TOKENS, "ignore_eos": True}


# --- the endpoint process -------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EndpointProcess]:
    # Room for ENDLESS_INPUT (the tiny engine's KV cache holds 64k tokens).
    folder = tmp_path_factory.mktemp("local-endpoint")
    with start_endpoint(worker_env, folder, LONG_CONTEXT_ENV) as process:
        yield process


def check_chunks(chunks: list[dict[str, Any]], *, prompt: str, n: int, max_tokens: int) -> None:
    """Cumulative chunks that each extend the last, and a final chunk with usage."""
    texts = [""] * n
    for chunk in chunks:
        assert len(chunk["text"]) == n
        for index, text in enumerate(chunk["text"]):
            assert text.startswith(texts[index])
            texts[index] = text
    # (A few random tokens can all decode to nothing: the length is checked by usage.)
    assert all(text.startswith(prompt) for text in texts)
    final = chunks[-1]
    assert final["finish_reason"] == ["length"] * n
    assert final["usage"]["completion_tokens"] == n * max_tokens


# --- tests ------------------------------------------------------------------------------


def seed_flow(endpoint: EndpointProcess) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The seed endpoint's own Python flow with the URL changed; /run's reply and the polls.

    Changed besides the URL: ``ignore_eos``, so that the random tiny model writes all of
    its tokens, ``max_tokens`` ``SEED_FLOW_TOKENS``, and polls every 0.1 s until
    COMPLETED instead of 10 polls a second apart.
    """
    url = f"{endpoint.url}/run"
    headers = {
        "Authorization": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "Content-Type": "application/json",
    }
    prompt = SEED_PROMPT
    payload = {
        "input": {
            "prompt": prompt,
            "sampling_params": {
                "max_tokens": SEED_FLOW_TOKENS,
                "n": 1,
                "presence_penalty": 0.2,
                "frequency_penalty": 0.7,
                "temperature": 0.3,
                "ignore_eos": True,
            },
        }
    }
    response = requests.post(url, headers=headers, json=payload, timeout=10)
    response_json = json.loads(response.text)
    status_url = f"{endpoint.url}/stream/{response_json['id']}"

    polls = []
    for _ in range(int(JOB_TIMEOUT_S / 0.1)):
        time.sleep(0.1)
        get_status = requests.get(status_url, headers=headers, timeout=10)
        polls.append(json.loads(get_status.text))
        if polls[-1]["status"] == "COMPLETED":
            break
    return response_json, polls


def test_the_seed_snippet_streams_tokens_over_http(endpoint: EndpointProcess) -> None:
    response_json, polls = seed_flow(endpoint)
    job_id = response_json["id"]
    assert response_json == {"id": job_id, "status": "IN_QUEUE"}
    assert polls[-1]["status"] == "COMPLETED", polls[-1]
    order = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert [order.index(poll["status"]) for poll in polls] == sorted(
        order.index(poll["status"]) for poll in polls
    )
    for poll in polls:
        assert set(poll) == {"id", "status", "stream"}
        assert poll["id"] == job_id
        assert all(set(item) == {"output"} for item in poll["stream"])
    # Each poll returned what was new since the previous one: together, every chunk once.
    chunks = [item["output"] for poll in polls for item in poll["stream"]]
    check_chunks(chunks, prompt=SEED_PROMPT, n=1, max_tokens=SEED_FLOW_TOKENS)

    final = status(endpoint, job_id)
    assert set(final) == {"id", "status", "delayTime", "executionTime", "output"}
    assert final["status"] == "COMPLETED"
    assert final["output"] == chunks  # the aggregate: all chunks, in order
    assert final["output"][-1]["text"] == chunks[-1]["text"]
    assert isinstance(final["delayTime"], int)
    assert final["executionTime"] > 0
    # Nothing is left to stream; POST reads the same as GET.
    assert requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json() == {
        "id": job_id,
        "status": "COMPLETED",
        "stream": [],
    }
    assert requests.post(f"{endpoint.url}/status/{job_id}", timeout=10).json() == final

    partial = [poll for poll in polls if poll["status"] == "IN_PROGRESS" and poll["stream"]]
    # How many polls saw partial output depends on the machine (a loopback stall of
    # seconds can hide a whole job): the next test shows it on a job that cannot end first.
    print(
        f"seed flow: {len(chunks)} chunks, {len(polls)} polls, {len(partial)} with partial "
        f"output; executionTime {final['executionTime']} ms"
    )


def test_the_first_chunk_can_be_read_while_the_job_runs(endpoint: EndpointProcess) -> None:
    """From POST /run to the first /stream reply with a chunk, polling every 10 ms: the
    chunk comes while the job is IN_PROGRESS (one too long to end by itself), and a later
    poll brings more while it still runs: the stream delivers text as it is written. The
    time is printed, not bounded (the benchmark measures it: ``bench/``)."""
    figures = []
    for attempt in range(3):
        job_input = {
            "prompt": f"Attempt {attempt}: once upon a time",
            # With ignore_eos the tiny random model writes mostly <s>, </s> and <unk>, which
            # vLLM leaves out of the text by default: a sequence can then write thousands
            # of tokens and no text (a busy-core CI run saw none for 120 s). Shown, every
            # token adds text, so that a later poll brings more does not depend on luck.
            "sampling_params": {**ENDLESS_INPUT, "skip_special_tokens": False},
        }
        started = time.monotonic()
        job_id = submit(endpoint, job_input)
        deadline = started + JOB_TIMEOUT_S
        url = f"{endpoint.url}/stream/{job_id}"
        texts: list[str] = []  # the text of each poll that brought output while it ran
        while len(texts) < 2:
            seen = requests.get(url, timeout=10).json()
            assert seen["status"] == "IN_PROGRESS" or not seen["stream"], seen["status"]
            if seen["stream"]:
                assert all("finish_reason" not in item["output"] for item in seen["stream"])
                text = seen["stream"][-1]["output"]["text"][0]
                if not texts:
                    figures.append(time.monotonic() - started)
                    texts.append(text)
                elif len(text) > len(texts[0]):  # a token may add no text yet (part of a character)
                    texts.append(text)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert texts[1].startswith(texts[0])  # cumulative, growing while the job runs
        assert requests.post(f"{endpoint.url}/cancel/{job_id}", timeout=10).json() == {
            "id": job_id,
            "status": "CANCELLED",
        }
    print(
        "time to first chunk via HTTP polling: "
        f"{', '.join(f'{figure * 1000:.0f}' for figure in figures)} ms"
    )


def test_runsync_returns_the_result_or_the_job_to_poll(endpoint: EndpointProcess) -> None:
    job_input = {"prompt": "Quick:", "sampling_params": {"max_tokens": 16, "ignore_eos": True}}
    reply = requests.post(f"{endpoint.url}/runsync", json={"input": job_input}, timeout=100)
    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {"id", "status", "delayTime", "executionTime", "output"}
    assert body["id"].startswith("sync-")
    assert body["status"] == "COMPLETED"
    check_chunks(body["output"], prompt="Quick:", n=1, max_tokens=16)
    assert status(endpoint, body["id"]) == body

    # A job longer than ?wait= (1 s), one that cannot end by itself: the reply says where
    # it is, after the wait; it runs on.
    long_input = {"prompt": "Slow:", "sampling_params": ENDLESS_INPUT}
    started = time.monotonic()
    reply = requests.post(
        f"{endpoint.url}/runsync?wait=1000", json={"input": long_input}, timeout=100
    )
    waited = time.monotonic() - started
    body = reply.json()
    assert body["status"] in {"IN_QUEUE", "IN_PROGRESS"}, body
    assert "output" not in body
    assert 0.9 < waited < 10.0  # ?wait=1000 answers after a second, however slow the job
    assert status(endpoint, body["id"])["status"] in {"IN_QUEUE", "IN_PROGRESS"}
    cancelled = requests.post(f"{endpoint.url}/cancel/{body['id']}", timeout=10).json()
    assert cancelled == {"id": body["id"], "status": "CANCELLED"}


def test_a_validation_error_fails_the_job_and_the_next_one_works(
    endpoint: EndpointProcess,
) -> None:
    bad = {"prompt": "Hello", "sampling_params": {"temperature": 5, "max_tokens": 4}}
    job_id = submit(endpoint, bad)
    final = wait_final(endpoint, job_id)
    assert set(final) == {"id", "status", "delayTime", "executionTime", "error"}
    assert final["status"] == "FAILED"
    assert final["error"].startswith("invalid_input: sampling_params.temperature")
    assert "Traceback" not in final["error"]
    streamed = requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json()
    assert streamed == {"id": job_id, "status": "FAILED", "stream": [], "error": final["error"]}

    good = {"prompt": "Hello", "sampling_params": {"max_tokens": 8, "ignore_eos": True}}
    final = wait_final(endpoint, submit(endpoint, good))
    assert final["status"] == "COMPLETED"
    check_chunks(final["output"], prompt="Hello", n=1, max_tokens=8)

    # Requests the endpoint itself refuses.
    no_input = requests.post(f"{endpoint.url}/run", json={"prompt": "Hello"}, timeout=10)
    assert no_input.status_code == 400
    assert "input" in no_input.json()["error"]
    unknown = requests.get(f"{endpoint.url}/status/no-such-job", timeout=10)
    assert (unknown.status_code, unknown.json()) == (404, {"error": "request does not exist"})


def test_cancel_mid_stream_stops_the_generation(endpoint: EndpointProcess) -> None:
    """Two long jobs side by side; one, too long to end by itself, is cancelled once it
    streams. Its vLLM request is aborted, and nothing it posted after the cancel is kept;
    the other completes."""
    endless = {"prompt": "A long story:", "sampling_params": ENDLESS_INPUT}
    job_id, twin_id = submit(endpoint, endless), submit(endpoint, LONG_STORY)
    submitted = time.monotonic()
    while not requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json()["stream"]:
        assert time.monotonic() < submitted + JOB_TIMEOUT_S
        time.sleep(0.02)
    cancel = requests.post(f"{endpoint.url}/cancel/{job_id}", timeout=10).json()
    cancelled_at = time.monotonic()
    assert cancel == {"id": job_id, "status": "CANCELLED"}
    # What was streamed before the cancel can still be read.
    before = requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json()
    assert before["status"] == "CANCELLED"

    # The worker's SDK got the stop signal and cancelled the job's task, which aborted the
    # vLLM request (the worker logs it with the tokens generated so far).
    aborted = endpoint.wait_for_log(
        rf"request {re.escape(job_id)}-\w+ aborted after (\d+) tokens", JOB_TIMEOUT_S
    )
    stopped_after = time.monotonic() - cancelled_at
    twin = wait_final(endpoint, twin_id)
    assert twin["status"] == "COMPLETED"
    log = endpoint.log()
    assert int(aborted.group(1)) < 2 * ENDLESS_TOKENS  # stopped before its end
    assert twin["output"][-1]["usage"]["completion_tokens"] == 4 * LONG_TOKENS
    assert f"job {job_id} done:" not in log  # the handler never finished it
    assert log.index(f"| {job_id} | Stopping job.") < aborted.start()

    final = status(endpoint, job_id)
    assert final["status"] == "CANCELLED"
    assert "output" not in final
    # Nothing the worker posted after the cancel was taken.
    assert requests.get(f"{endpoint.url}/stream/{job_id}", timeout=10).json() == {
        "id": job_id,
        "status": "CANCELLED",
        "stream": [],
    }
    # What the worker posted after the cancel (ignored above): the posts in flight until
    # the stop reached it; far fewer than a whole generation, which its twin shows.
    late = [int(n) for n in re.findall(rf"job {job_id} is CANCELLED: ignored post (\d+)", log)]
    assert max(late, default=0) < len(twin["output"]) / 2, (late, len(twin["output"]))
    print(
        f"cancel: aborted after {aborted.group(1)} of {2 * ENDLESS_TOKENS} tokens; the test saw it "
        f"{stopped_after * 1000:.0f} ms after /cancel (an upper bound: "
        f"{_stop_latency_ms(log, job_id):.0f} ms in the log); {max(late, default=0)} late "
        f"posts ignored; its twin took {time.monotonic() - submitted:.1f} s"
    )


def _stop_latency_ms(log: str, job_id: str) -> float:
    """From the endpoint's cancel to the next timestamped log line after the SDK's
    "Job stopped." (the SDK's own lines carry no time): an upper bound."""
    lines = log.splitlines()

    def stamp(line: str) -> float | None:
        found = re.match(r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) ", line)
        if found is None:
            return None
        hours, minutes, seconds, millis = (int(part) for part in found.groups())
        return ((hours * 60 + minutes) * 60 + seconds) * 1000.0 + millis

    cancelled = next(i for i, line in enumerate(lines) if f"job {job_id}: cancel ->" in line)
    stopped = next(i for i, line in enumerate(lines) if f"| {job_id} | Job stopped." in line)
    after = next(t for line in lines[stopped:] if (t := stamp(line)) is not None)
    start = stamp(lines[cancelled])
    assert start is not None
    return after - start


def test_fifty_concurrent_jobs_all_complete_correctly(endpoint: EndpointProcess) -> None:
    specs = [(1 + number % 4, (8, 16, 24, 32, 48)[number % 5]) for number in range(50)]
    submitted_at = {}
    jobs = {}
    started = time.monotonic()
    for number, (n, max_tokens) in enumerate(specs):
        job_input = {
            "prompt": f"Job {number}: a story about the number {number}",
            "sampling_params": {"n": n, "max_tokens": max_tokens, "ignore_eos": True},
        }
        job_id = submit(endpoint, job_input)
        submitted_at[job_id] = time.monotonic()
        jobs[job_id] = (number, n, max_tokens, job_input["prompt"])
    assert len(jobs) == 50  # 50 distinct ids

    finals: dict[str, dict[str, Any]] = {}
    peak_in_progress = 0
    deadline = started + 300
    while len(finals) < len(jobs):
        endpoint.check_alive()
        assert time.monotonic() < deadline, f"{len(jobs) - len(finals)} jobs not done"
        peak_in_progress = max(peak_in_progress, health(endpoint)["jobs"]["inProgress"])
        for job_id in jobs:
            if job_id not in finals:
                body = status(endpoint, job_id)
                if body["status"] not in {"IN_QUEUE", "IN_PROGRESS"}:
                    finals[job_id] = body
                    finals[job_id]["_seen_at"] = time.monotonic()
        time.sleep(0.1)
    elapsed = time.monotonic() - started

    for job_id, (_number, n, max_tokens, prompt) in jobs.items():
        final = finals[job_id]
        assert final["status"] == "COMPLETED", final
        output = final["output"]
        texts = output[-1]["text"]
        assert len(texts) == n
        assert all(text.startswith(prompt) for text in texts)  # its own prompt: no mix-up
        assert output[-1]["usage"]["completion_tokens"] == n * max_tokens
        check_chunks(output, prompt=prompt, n=n, max_tokens=max_tokens)

    # Each job was handed out once (the endpoint logs every take at DEBUG).
    takes = re.findall(r"worker \S+ took (.+)", endpoint.log())
    taken = [job_id for line in takes for job_id in line.split(", ")]
    assert sorted(job_id for job_id in taken if job_id in jobs) == sorted(jobs)

    # They ran at once: in flight together on the endpoint's side and in the worker.
    intervals = []
    for job_id, final in finals.items():
        start = submitted_at[job_id] + final["delayTime"] / 1000
        intervals.append((start, start + final["executionTime"] / 1000))
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    overlap = peak = 0
    for _at, step in points:
        overlap += step
        peak = max(peak, overlap)
    # By the endpoint's own clock (a client's /health polls may miss short jobs).
    assert peak > 1
    print(
        f"50 concurrent jobs: all COMPLETED in {elapsed:.1f} s; peak in progress "
        f"{peak_in_progress} (/health), {peak} (from delayTime/executionTime)"
    )


def test_the_runpod_sdk_client_works_with_only_the_base_url_changed(
    endpoint: EndpointProcess,
) -> None:
    import runpod

    runpod.api_key = "not-checked-locally"
    runpod.endpoint_url_base = endpoint.url.rsplit("/", 1)[0]  # http://127.0.0.1:<port>/v2
    sdk_endpoint = runpod.Endpoint("local")

    job_input = {"prompt": "SDK:", "sampling_params": {"max_tokens": 12, "ignore_eos": True}}
    run_request = sdk_endpoint.run(job_input)
    output = run_request.output(timeout=60)
    check_chunks(output, prompt="SDK:", n=1, max_tokens=12)
    assert run_request.status() == "COMPLETED"
    assert list(run_request.stream()) == output  # /stream had not been read for it

    output = sdk_endpoint.run_sync(job_input, timeout=60)
    check_chunks(output, prompt="SDK:", n=1, max_tokens=12)
    assert set(sdk_endpoint.health()) == {"jobs", "workers"}
    assert sdk_endpoint.purge_queue() == {"removed": 0, "status": "completed"}


def test_our_client_streams_text_equal_to_the_final_output(endpoint: EndpointProcess) -> None:
    client = EndpointClient(endpoint.url)
    job_input = {
        "prompt": "Once upon a time",
        "sampling_params": {"max_tokens": 40, "ignore_eos": True, "n": 2},
    }
    job_id = client.submit(job_input)
    tracker = DeltaTracker(cumulative=True)
    deltas = [delta for chunk in client.stream(job_id) for delta in tracker.feed(chunk)]
    final = status(endpoint, job_id)
    assert final["status"] == "COMPLETED"
    last_chunk = final["output"][-1]
    assert [tracker.texts[0], tracker.texts[1]] == last_chunk["text"]
    assert "".join(d.text for d in deltas if d.index == 0) == last_chunk["text"][0]
    assert tracker.final is not None
    assert tracker.final["usage"]["completion_tokens"] == 80


def test_our_client_cli_prints_the_text_and_usage(endpoint: EndpointProcess) -> None:
    job_input = {
        "prompt": "Hello there",
        "echo": False,
        "sampling_params": {"max_tokens": 12, "ignore_eos": True, "seed": 3},
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_worker.client",
            "--url",
            endpoint.url,
            "--input",
            json.dumps(job_input),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "'completion_tokens': 12" in result.stderr
    synced = EndpointClient(endpoint.url).run_sync(job_input)
    assert synced["status"] == "COMPLETED"
    assert result.stdout.rstrip("\n") == synced["output"][-1]["text"][0].rstrip("\n")


def test_our_client_reports_a_failed_job(endpoint: EndpointProcess) -> None:
    client = EndpointClient(endpoint.url)
    with pytest.raises(EndpointError, match=r"FAILED: invalid_input: sampling_params\.top_p"):
        list(client.stream_text({"prompt": "x", "sampling_params": {"top_p": 0}}))


def test_sigterm_stops_the_endpoint_and_its_worker(endpoint: EndpointProcess) -> None:
    """Runs last: Ctrl-C / SIGTERM stops the worker (SIGTERM, then SIGKILL) and exits 0."""
    endpoint.proc.send_signal(signal.SIGTERM)
    assert endpoint.proc.wait(STOP_TIMEOUT_S) == 0
    log = endpoint.log()
    assert "worker exited with code 0" in log, re.findall(r".*(?:worker|SIG).*", log)[-20:]
    deadline = time.monotonic() + 5
    while group_members(endpoint.worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(endpoint.worker_pid) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{endpoint.url}/health", timeout=5)
