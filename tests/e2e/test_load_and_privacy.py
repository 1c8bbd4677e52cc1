"""Through the local endpoint and the runpod SDK's real job loop: bad input ends FAILED,
200 jobs at once all complete correctly, and the log holds no prompt and no secret.

One endpoint and worker serve the module, at the default log level (LOG_LEVEL and
RUNPOD_LOG_LEVEL unset). Every prompt sent holds ``MARKER``; the last test reads the
whole log (the endpoint's and its worker's, vLLM's included) for it and for the secrets.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given

from bad_inputs import (
    MARKER,
    PROMPT,
    check_input_error,
    check_structured_output_error,
    fuzz,
    malformed_input,
    structured_output_jobs,
)
from endpoint_process import EndpointProcess, health, start_endpoint, submit, wait_final

HF_TOKEN = "hf_c2PrivacyCheckTokenDoNotLog0123"
API_KEY = "rpa_c2PrivacyCheckEndpointKey4567"  # what clients send to the endpoint
LOAD_JOBS = 200
LOAD_PROMPTS = [
    f"{MARKER} {i}: "
    + " ".join(["once upon a time", "the sea", "a red fox", "in 1789"][: 1 + i % 4])
    for i in range(20)
]
GREEDY = {"temperature": 0, "max_tokens": 16}


@pytest.fixture(scope="module")
def endpoint(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EndpointProcess]:
    extra_env = {"LOG_LEVEL": "", "HF_TOKEN": HF_TOKEN, "MAX_CONCURRENCY": "64"}
    workdir = tmp_path_factory.mktemp("load-and-privacy")
    with start_endpoint(worker_env, workdir, extra_env=extra_env, api_key=API_KEY) as process:
        yield process


def test_malformed_inputs_end_failed_with_a_one_line_error(endpoint: EndpointProcess) -> None:
    kinds: Counter[str] = Counter()

    @fuzz(60)
    @given(malformed_input())
    def one(case: tuple[str, Any]) -> None:
        kind, raw = case
        body = wait_final(endpoint, _submit_any(endpoint, raw))
        assert body["status"] == "FAILED", f"{raw!r:.200}: {body!r:.500}"
        assert "output" not in body
        check_input_error(body["error"], raw)
        kinds[kind] += 1

    one()
    print(f"\nmalformed inputs through the endpoint: {sum(kinds.values())}, {dict(kinds)}")
    assert sum(kinds.values()) >= 50
    final = wait_final(endpoint, submit(endpoint, {"prompt": PROMPT, "sampling_params": GREEDY}))
    assert final["status"] == "COMPLETED", final


def test_fuzzed_structured_outputs_end_each_alone(endpoint: EndpointProcess) -> None:
    """Random constraints on the worker's default backend (``auto``: vLLM picks xgrammar,
    guidance or outlines per request, its engine core keeps one): each job ends COMPLETED or
    FAILED in one line, and the worker serves the next job."""

    @fuzz(40)
    @given(structured_output_jobs())
    def one(job: dict[str, Any]) -> None:
        body = wait_final(endpoint, submit(endpoint, job))
        if body["status"] == "FAILED":
            check_structured_output_error(body["error"], job)
        else:
            assert body["status"] == "COMPLETED", body

    one()
    final = wait_final(endpoint, submit(endpoint, {"prompt": PROMPT, "sampling_params": GREEDY}))
    assert final["status"] == "COMPLETED", final


def test_200_jobs_at_once_all_complete_with_the_right_text(endpoint: EndpointProcess) -> None:
    reference = {prompt: _only_output(_run_one(endpoint, prompt)) for prompt in LOAD_PROMPTS}
    prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(LOAD_JOBS)]
    before = health(endpoint)["jobs"]
    memory = _MemorySampler(endpoint.worker_pid)
    with memory, ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda prompt: submit(endpoint, _greedy_job(prompt)), prompts))
        assert len(set(ids)) == LOAD_JOBS
        bodies = list(pool.map(lambda job_id: wait_final(endpoint, job_id), ids))
    for prompt, job_id, body in zip(prompts, ids, bodies, strict=True):
        assert body["id"] == job_id
        assert body["status"] == "COMPLETED", body
        assert _only_output(body) == reference[prompt], f"job {job_id}"
    # The endpoint counted each once, and each ran once in the worker (one "done" line).
    after = health(endpoint)["jobs"]
    assert after["completed"] - before["completed"] == LOAD_JOBS
    assert (after["failed"], after["retried"]) == (before["failed"], before["retried"])
    done = Counter(
        line.split("job ", 1)[1].split(" ", 1)[0]
        for line in endpoint.log().splitlines()
        if " done: prompt_tokens=" in line
    )
    assert all(done[job_id] == 1 for job_id in ids), [i for i in ids if done[i] != 1]
    print(
        f"\n{LOAD_JOBS} jobs: worker + engine processes RSS {memory.first_mb:.0f} MB before, "
        f"peak {memory.peak_mb:.0f} MB, {memory.last_mb:.0f} MB after; peak per process "
        f"(VmHWM) {memory.high_water_marks()}"
    )
    assert memory.peak_mb < 12_000  # generous: about 3 GB here, mostly vLLM's imports
    assert memory.last_mb < memory.first_mb + 1_000


def test_the_log_holds_no_prompt_and_no_secret(endpoint: EndpointProcess) -> None:
    # Jobs that end every way: completed, streamed, failed with the prompt in odd places.
    for job_input in (
        {"prompt": PROMPT, "sampling_params": {"max_tokens": 8, "logprobs": 2}},
        {"messages": [{"role": "user", "content": PROMPT}], "sampling_params": {"max_tokens": 8}},
        {"prompt": PROMPT, "sampling_params": {"stop": [PROMPT], "temperature": PROMPT}},
        {"prompt": PROMPT, "sampling_params": {"bad_words": [" "], "max_tokens": 8}},
        {"prompt": PROMPT, PROMPT: PROMPT},
        {"prompt": PROMPT * 300},
    ):
        wait_final(endpoint, submit(endpoint, job_input))
    log = endpoint.log()
    assert " done: prompt_tokens=" in log and "failed: invalid_input" in log  # a real log
    worker_key = _environ(endpoint.worker_pid).get("RUNPOD_AI_API_KEY", "")
    assert len(worker_key) >= 16, "the endpoint gives its worker a key"
    for secret in (MARKER, *MARKER.split(), HF_TOKEN, API_KEY, worker_key):
        assert secret not in log, f"{secret!r} is in the log"


# --- helpers ------------------------------------------------------------------------------


def _submit_any(endpoint: EndpointProcess, job_input: Any) -> str:
    """``submit``, also for inputs that are not strict JSON (NaN, infinity)."""
    body = json.dumps({"input": job_input})  # NaN as Python's json writes and reads it
    reply = requests.post(f"{endpoint.url}/run", data=body, headers=endpoint.headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


def _greedy_job(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "sampling_params": GREEDY, "stream": False}


def _run_one(endpoint: EndpointProcess, prompt: str) -> dict[str, Any]:
    return wait_final(endpoint, submit(endpoint, _greedy_job(prompt)))


def _only_output(body: dict[str, Any]) -> str:
    """The one result of a non-streamed job: its final chunk's text."""
    assert body["status"] == "COMPLETED", body
    (chunk,) = body["output"]  # stream false: exactly one chunk, never two
    (text,) = chunk["text"]
    assert chunk["finish_reason"] in (["length"], ["stop"])
    return str(text)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the engine core and its worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _MemorySampler:
    """The summed RSS of the worker's process tree, sampled every 0.2 s while in use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> _MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()

    def _sample(self) -> None:
        self.samples.append(sum(_status_kb(pid, "VmRSS") for pid in _tree(self.pid)) / 1024)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    @property
    def first_mb(self) -> float:
        return self.samples[0]

    @property
    def last_mb(self) -> float:
        return self.samples[-1]

    @property
    def peak_mb(self) -> float:
        return max(self.samples)

    def high_water_marks(self) -> dict[int, str]:
        return {pid: f"{_status_kb(pid, 'VmHWM') / 1024:.0f} MB" for pid in _tree(self.pid)}
