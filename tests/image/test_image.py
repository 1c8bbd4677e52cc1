"""The image, built from the project's real Dockerfile and run for real.

Built on a local stand-in for ``vllm/vllm-openai:v0.32.0`` (``standin/Dockerfile``: vLLM's
CPU build, installed as vLLM's image installs vLLM), the one difference from what ships
(``BASE_IMAGE``). Each check runs the image with the ``docker run`` options the README
gives users (but ``--gpus all``: there is no GPU here), plus the settings that serve the
tiny model on a CPU:

- the build with a baked model (the token a BuildKit secret) and the RunPod Hub's
  default build (no argument, no secret);
- local test mode offline (``--network none``) on the real demo model, baked as a public
  Hub model: the seed's request answered in English; a bad ``--test_input``;
- production mode against the local endpoint on the host (``--no-worker``): the seed's
  flow, ``n=2``, a cancel, a bad input, an OpenAI-route chat;
- ``docker stop`` while a job runs and while the engine is still starting;
- the token nowhere in the image; a rebuild after an edit in ``src/`` reuses the model;
- load-balancing mode on the demo model: /ping's states, a streamed chat completion,
  ``docker stop``.

Not checked here (no GPU, no registry): the CUDA build, a GPU, RunPod's own builder.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from fake_hub import FakeHub
from helpers import (
    ENDLESS_TOKENS,
    LONG_CONTEXT_ENV,
    SEED_INPUT,
    SEED_SAMPLING_SHORT,
    assert_english,
    assert_on_the_seeds_subject,
)
from image_support import (
    FIGURES,
    REPO_ID,
    TINY_SETTINGS,
    TOKEN,
    BuiltImage,
    Docker,
    env_options,
    readme_run_options,
)
from lb_worker import free_port
from vllm_worker import demo_model
from vllm_worker.local_endpoint import stall
from vllm_worker.local_endpoint.process import own_process_group

JOB_TIMEOUT_S = 180.0
START_TIMEOUT_S = 300.0
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# A job the module's worker cannot finish before the test stops it: 4 x 30,000 tokens is
# over a minute even at the container's fastest (about 2,000 tokens/s for a batch), longer
# than the stalls of these machines between seeing its first chunk and the worker
# getting the cancel or the stop. The worker serves 32,768 positions for it.
ENDLESS_INPUT = {
    "prompt": "Long:",
    "sampling_params": {"n": 4, "max_tokens": ENDLESS_TOKENS, "ignore_eos": True},
}
LONG_CONTEXT = {
    **LONG_CONTEXT_ENV,
    "KV_CACHE_MEMORY_BYTES": str(512 * 2**20),  # 4 x 30,000 tokens at 2 KB each
}


def shell(docker: Docker, image: BuiltImage, command: str) -> str:
    """A shell command's output in the image, with no network."""
    run = ("run", "--rm", "--network", "none", "--entrypoint", "bash", image.tag, "-c", command)
    return str(docker(*run).stdout)


# --- the builds -------------------------------------------------------------------------------


def test_the_readme_tells_users_to_give_vllm_its_shared_memory() -> None:
    # Docker's default 64 MB /dev/shm is too small for vLLM's engine processes.
    assert "--ipc=host" in readme_run_options()


def test_the_baked_image_holds_the_model_and_nothing_of_the_build(
    docker: Docker, baked_image: BuiltImage
) -> None:
    manifest = json.loads(shell(docker, baked_image, "cat /models/manifest.json"))
    assert manifest["model_name"] == REPO_ID
    assert manifest["files"]
    assert shell(docker, baked_image, "ls -A /app").split() == [
        "src",
        "test_input.json",
    ]  # no builder/, requirements/
    assert shell(docker, baked_image, "ls -A /app/src").split() == ["handler.py"]
    assert (
        shell(docker, baked_image, 'echo "$HF_HUB_OFFLINE $MODEL_NAME"').strip() == f"1 {REPO_ID}"
    )
    layers = docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", baked_image.tag).stdout
    sizes = [line.split("\t", 1) for line in layers.splitlines()]
    FIGURES.values["image layers (size, step)"] = "; ".join(
        f"{size} {step[:60]}" for size, step in sizes if size not in {"0B"}
    )[:1500]
    FIGURES.values["image size"] = docker(
        "image", "inspect", "-f", "{{.Size}}", baked_image.tag
    ).stdout.strip()


def test_the_hub_default_build_needs_no_argument_and_no_secret(
    docker: Docker, hub_default_image: BuiltImage
) -> None:
    shown = shell(
        docker,
        hub_default_image,
        "test -e /models/manifest.json && echo baked || echo unbaked; echo $HF_HUB_OFFLINE",
    ).split()
    assert shown == ["unbaked", "0"]
    assert "BAKE_MODEL=0: the worker downloads" in hub_default_image.log


# --- local test mode ----------------------------------------------------------------------------


def test_local_test_mode_runs_test_input_json_offline_and_the_demo_model_answers_it(
    docker: Docker, demo_image: BuiltImage, tmp_path: Path
) -> None:
    """The real demo model baked in: the seed's request, in a test_input.json where the
    image keeps its own, is answered in English, on its subject, with no network
    (``SEED_SAMPLING_SHORT``: 100 of its tokens, with a seed; the e2e tests run the file)."""
    seed_request = {"input": {**SEED_INPUT, "sampling_params": SEED_SAMPLING_SHORT}}
    (tmp_path / "test_input.json").write_text(json.dumps(seed_request))
    settings = {**TINY_SETTINGS, **demo_model.SERVING}
    del settings["SERVED_MODEL_NAME"]  # the baked MODEL_NAME is already the public name
    started = time.monotonic()
    result = docker(
        "run",
        *readme_run_options(),
        "--network",
        "none",
        "--volume",
        f"{tmp_path / 'test_input.json'}:/app/test_input.json:ro",
        *env_options(settings),
        demo_image.tag,
        timeout=600,
        check=False,
    )
    FIGURES.values["local test mode, the demo model, docker run to exit"] = (
        f"{time.monotonic() - started:.0f} s"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chunks = [line for line in result.stdout.splitlines() if line.startswith("chunk ")]
    assert len(chunks) >= 2
    assert f"model: {demo_model.SERVED_NAME} at " in result.stderr  # baked, found offline
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("Job result: ")]
    [text] = json.loads(line.removeprefix("Job result: "))["output"]["text"]
    answer = text.removeprefix(SEED_INPUT["prompt"])
    assert_english(answer)
    assert_on_the_seeds_subject(answer)


def test_a_bad_test_input_exits_1_with_its_one_line_error(
    docker: Docker, baked_image: BuiltImage
) -> None:
    result = docker(
        "run",
        *readme_run_options(),
        "--network",
        "none",
        *env_options(TINY_SETTINGS),
        baked_image.tag,
        "--test_input",
        '{"input": {"prompt": "x", "sampling_params": {"top_p": 7}}}',
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Job failed: ")]
    assert len(errors) == 1
    assert errors[0].startswith("Job failed: invalid_input: sampling_params.top_p")
    assert "starting the engine" not in result.stderr  # refused before the model loads


# --- production mode, against the local endpoint on the host --------------------------------


@dataclass
class Endpoint:
    proc: subprocess.Popen[bytes]
    url: str
    worker_env: dict[str, str]
    log_path: Path

    def get(self, path: str) -> Any:
        return requests.get(f"{self.url}{path}", timeout=30).json()

    def post(self, path: str, body: Any = None) -> Any:
        return requests.post(f"{self.url}{path}", json=body, timeout=30).json()

    def submit(self, job_input: dict[str, Any]) -> str:
        return str(self.post("/run", {"input": job_input})["id"])

    def until(self, job_id: str, states: set[str], timeout_s: float = JOB_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while (body := self.get(f"/status/{job_id}"))["status"] not in states:
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        return body

    def until_streaming(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Until the job's first chunk is on the endpoint: its handler runs in the worker.
        (``IN_PROGRESS`` alone only says a take answered with it: the worker may not have
        started the job yet when a stall delays it.)"""
        deadline = time.monotonic() + timeout_s
        while not (body := self.get(f"/stream/{job_id}"))["stream"]:
            assert body["status"] in {"IN_QUEUE", "IN_PROGRESS"}, body
            assert time.monotonic() < deadline, body
            time.sleep(0.2)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """``python -m vllm_worker.local_endpoint --no-worker`` on the host's loopback."""
    log_path = tmp_path_factory.mktemp("endpoint") / "endpoint.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_worker.local_endpoint", "--no-worker", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            **own_process_group(),
        )
    try:
        deadline = time.monotonic() + 30
        while "export RUNPOD_SKIP_GPU_CHECK" not in (text := log_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.1)
        url = re.search(r"listening on (http://\S+/v2/local)", text)
        assert url is not None, text
        exports = dict(re.findall(r"export (\w+)='([^']*)'", text))
        yield Endpoint(proc, url.group(1), exports, log_path)
    finally:
        proc.terminate()
        proc.wait(30)
        # Whether the container starved the host's endpoint: into the run's stall summary.
        for late_s in stall.stalls_in(log_path.read_text()):
            stall.report(late_s, where="the image checks' endpoint")


class Container:
    """A detached container (``--rm``, as the README runs it: gone once it exits), its
    output followed into a file and its exit code awaited from the start."""

    def __init__(self, docker: Docker, name: str, log_path: Path) -> None:
        self.docker, self.name, self.log_path = docker, name, log_path
        with log_path.open("wb") as log:
            self._follow = subprocess.Popen(
                [docker.cli, "logs", "-f", name], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait = subprocess.Popen([docker.cli, "wait", name], stdout=subprocess.PIPE, text=True)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self._wait.poll() is None

    def exit_code(self, timeout_s: float = 60) -> int:
        output, _ = self._wait.communicate(timeout=timeout_s)
        self._follow.wait(30)
        return int(output.strip())

    def remove(self) -> None:
        self.docker("rm", "-f", self.name, check=False)
        for proc in (self._follow, self._wait):
            if proc.poll() is None:
                proc.kill()


def run_detached(
    docker: Docker, image: str, name: str, env: dict[str, str], log_path: Path
) -> Container:
    """The image detached, with the options the README gives, on the host network."""
    docker("rm", "-f", name, check=False)
    docker(
        "run",
        "-d",
        "--name",
        name,
        *readme_run_options(),
        "--network",
        "host",
        # A container is a scheduler group of its own (its cgroup): weighted as the host's
        # processes, its busy engine held the host's endpoint off the cores for up to 21 s
        # (own_process_group says more). At the least weight it runs whenever they idle.
        "--cpu-shares",
        "2",
        *env_options(env),
        image,
    )
    return Container(docker, name, log_path)


def start_worker(
    docker: Docker, image: str, endpoint: Endpoint, name: str, **settings: str
) -> Container:
    """The image in production mode, attached to the endpoint as the README says."""
    env = {**TINY_SETTINGS, **endpoint.worker_env, "RUNPOD_POD_ID": name, **settings}
    return run_detached(docker, image, name, env, endpoint.log_path.with_name(f"{name}.log"))


def until_serving(endpoint: Endpoint, container: Container) -> float:
    started = time.monotonic()
    while True:
        workers = endpoint.get("/health")["workers"]
        if workers["idle"] + workers["running"] >= 1:
            return time.monotonic() - started
        assert container.running(), container.logs()[-3000:]
        assert time.monotonic() - started < START_TIMEOUT_S, container.logs()[-3000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def worker(docker: Docker, baked_image: BuiltImage, endpoint: Endpoint) -> Iterator[Container]:
    container = start_worker(docker, baked_image.tag, endpoint, "vllm-worker-check", **LONG_CONTEXT)
    try:
        FIGURES.values["production mode, docker run to the first job-take"] = (
            f"{until_serving(endpoint, container):.1f} s"
        )
        yield container
    except BaseException:
        print(container.logs()[-5000:])
        raise
    finally:
        container.remove()


def stream_until_done(endpoint: Endpoint, job_id: str) -> list[Any]:
    """The seed's client: GET /stream until COMPLETED; every chunk it got."""
    chunks: list[Any] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        polled = endpoint.get(f"/stream/{job_id}")
        chunks += [item["output"] for item in polled["stream"]]
        if polled["status"] in FINAL:
            assert polled["status"] == "COMPLETED", polled
            return chunks
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_production_the_seeds_flow(endpoint: Endpoint, worker: Container) -> None:
    job_input = {
        **SEED_INPUT,
        "sampling_params": {**SEED_INPUT["sampling_params"], "ignore_eos": True},
    }
    job_id = endpoint.submit(job_input)
    chunks = stream_until_done(endpoint, job_id)
    texts = [chunk["text"][0] for chunk in chunks]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert texts[0].startswith(SEED_INPUT["prompt"])  # cumulative, the prompt echoed
    final = chunks[-1]
    assert final["finish_reason"] == ["length"]
    assert final["usage"]["completion_tokens"] == SEED_INPUT["sampling_params"]["max_tokens"]
    assert endpoint.get(f"/status/{job_id}")["output"][-1] == final


def test_production_n_2(endpoint: Endpoint, worker: Container) -> None:
    job_id = endpoint.submit(
        {"prompt": "Two tales:", "sampling_params": {"n": 2, "max_tokens": 16, "ignore_eos": True}}
    )
    final = endpoint.until(job_id, FINAL)["output"][-1]
    assert len(final["text"]) == 2 and final["usage"]["completion_tokens"] == 32


def test_production_a_cancel_ends_cancelled(endpoint: Endpoint, worker: Container) -> None:
    job_id = endpoint.submit(ENDLESS_INPUT)
    endpoint.until_streaming(job_id)  # its first chunk is out: it runs in the worker
    assert endpoint.post(f"/cancel/{job_id}")["status"] == "CANCELLED"
    deadline = time.monotonic() + 60
    while not re.search(rf"request {job_id}-\w+ aborted after \d+ tokens", worker.logs()):
        assert time.monotonic() < deadline, worker.logs()[-2000:]
        time.sleep(0.2)


def test_production_a_bad_input_ends_failed_with_one_line(
    endpoint: Endpoint, worker: Container
) -> None:
    job_id = endpoint.submit({"prompt": "x", "sampling_params": {"temperature": 9}})
    body = endpoint.until(job_id, FINAL)
    assert body["status"] == "FAILED"
    assert body["error"].startswith("invalid_input: sampling_params.temperature")
    assert "\n" not in body["error"]


def test_production_an_openai_chat(endpoint: Endpoint, worker: Container) -> None:
    import openai

    client = openai.OpenAI(
        base_url=f"{endpoint.url}/openai/v1", api_key="none", max_retries=0, timeout=JOB_TIMEOUT_S
    )
    response = client.chat.completions.create(
        model=REPO_ID,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    assert response.usage is not None and response.usage.completion_tokens == 8
    assert response.model == REPO_ID


def test_docker_stop_ends_the_running_job_within_the_grace_period(
    docker: Docker, endpoint: Endpoint, worker: Container
) -> None:
    """Runs last of the module's worker: it stops it. The job cannot finish in the grace
    period (SHUTDOWN_GRACE_SECONDS, 5 s): it is posted FAILED and the worker exits 0 by
    itself, not SIGKILLed. (A job that finishes in the grace period is the production
    loop's e2e test, tests/e2e/test_production_loop.py.)"""
    job_id = endpoint.submit(ENDLESS_INPUT)
    endpoint.until_streaming(job_id)  # its first chunk is out: it runs in the worker
    started = time.monotonic()
    # SIGTERM, and SIGKILL after 60 s rather than Docker's (and RunPod's) 10 s: the worker
    # exits after the 5 s grace and the engine's shutdown (7-8 s, the figure below), but a
    # stall of these machines' processes (seconds) must not decide the test.
    docker("stop", "--time", "60", worker.name, timeout=120)
    stopped_s = time.monotonic() - started
    body = endpoint.until(job_id, FINAL, timeout_s=30)
    logs = worker.logs()
    code = worker.exit_code()
    assert code == 0, f"exit code {code} after {stopped_s:.1f} s: " + logs[-3000:]  # 137: SIGKILLed
    # No job lost: it failed as the README says, and was posted.
    assert body["status"] == "FAILED" and "SHUTDOWN_GRACE_SECONDS" in body["error"], body
    assert "stop signal: taking no more jobs; 1 in flight" in logs
    FIGURES.values["docker stop with a job running"] = (
        f"{body['status']}, exited after {stopped_s:.1f} s"
        f" ({_sigterm_to_exit_s(logs)} from SIGTERM to exit in the worker's log;"
        " RunPod and Docker SIGKILL after 10 s)"
    )


def _sigterm_to_exit_s(logs: str) -> str:
    """From the worker's "SIGTERM received" to its "exiting with code" (its own clock)."""
    stamps = [
        re.search(rf"^(\S+ [\d:]+,\d+) .*{what}", logs, re.M)
        for what in ("SIGTERM received", "exiting with code")
    ]
    if stamps[0] is None or stamps[1] is None:
        return "?"
    start, end = (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in stamps)
    return f"{(end - start).total_seconds():.1f} s"


def test_docker_stop_while_the_engine_starts_exits_at_once(
    docker: Docker, baked_image: BuiltImage, endpoint: Endpoint
) -> None:
    container = start_worker(docker, baked_image.tag, endpoint, "vllm-worker-check-start")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "starting the engine" not in container.logs():
            assert container.running() and time.monotonic() < deadline, container.logs()[-2000:]
            time.sleep(0.1)
        started = time.monotonic()
        docker("stop", "--time", "60", container.name, timeout=120)  # SIGKILL: see above
        stopped_s = time.monotonic() - started
        logs = container.logs()
        assert container.exit_code() == 0, logs[-3000:]
        assert stopped_s < 8.0, f"{stopped_s:.1f} s: not stopped by its own SIGTERM handling"
        assert "while the engine starts: stopping" in logs
        FIGURES.values["docker stop during the engine's start"] = f"exited after {stopped_s:.1f} s"
    finally:
        container.remove()


# --- secrets and cache ---------------------------------------------------------------------------


def test_the_token_is_nowhere_in_the_image(
    docker: Docker, baked_image: BuiltImage, tiny_hub: FakeHub
) -> None:
    # The build did use it: the gated repo answered only to it.
    assert any(r.authorization == f"Bearer {TOKEN}" for r in tiny_hub.requests)
    assert TOKEN not in docker("history", "--no-trunc", baked_image.tag).stdout
    assert TOKEN not in docker("image", "inspect", baked_image.tag).stdout
    assert TOKEN not in baked_image.log
    saved = subprocess.Popen([docker.cli, "save", baked_image.tag], stdout=subprocess.PIPE)
    assert saved.stdout is not None
    found = _stream_contains(saved.stdout, TOKEN.encode())
    saved.stdout.close()
    saved.wait(600)
    assert not found, "the token is in a file of `docker save`"


def _stream_contains(stream: Any, needle: bytes, block: int = 1 << 20) -> bool:
    """Whether ``needle`` occurs anywhere in the stream (every layer's every file)."""
    tail = b""
    while chunk := stream.read(block):
        if needle in tail + chunk:
            return True
        tail = chunk[-len(needle) :]
    return False


def test_a_rebuild_after_an_edit_in_src_reuses_the_baked_model(
    docker: Docker, baked_image: BuiltImage, tiny_hub: FakeHub
) -> None:
    edited = baked_image.context / "src" / "vllm_worker" / "__init__.py"
    edited.write_text(edited.read_text() + "# an edit\n")
    requests_before = len(tiny_hub.requests)
    log, seconds = docker.build(
        baked_image.context,
        baked_image.tag + "-edited",
        build_args=baked_image.build_args,
        secrets=baked_image.secrets,
    )
    assert len(tiny_hub.requests) == requests_before, "the builder ran again"
    download = re.search(r"^(#\d+) \[[^\]]+\] RUN --mount=type=secret", log, re.M)
    assert download is not None, log[-3000:]
    assert f"{download.group(1)} CACHED" in log
    assert re.search(r"COPY src/ src/", log)  # and the package was rebuilt
    FIGURES.values["rebuild after an edit in src/"] = f"{seconds:.0f} s, the model layer cached"


# --- load-balancing mode ------------------------------------------------------------------------


def test_load_balancer_mode_streams_a_chat_completion_and_stops_on_docker_stop(
    docker: Docker, demo_image: BuiltImage, tmp_path: Path
) -> None:
    """The same image as a load-balancing endpoint's server (``-e ENDPOINT_TYPE``), on the
    real demo model: /ping says 204 then 200, the official client streams a chat
    completion that answers the question, and ``docker stop`` drains it to exit 0. The
    host network stands in for ``-p`` (this Docker engine has no bridge)."""
    port = free_port()
    name = "vllm-worker-lb-check"
    settings = {**TINY_SETTINGS, **demo_model.SERVING, "ENDPOINT_TYPE": "load_balancer"}
    settings.update({"PORT": str(port), "HOST": "127.0.0.1"})
    del settings["SERVED_MODEL_NAME"]  # the baked MODEL_NAME is already the public name
    started = time.monotonic()
    container = run_detached(docker, demo_image.tag, name, settings, tmp_path / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        pings: list[int] = []
        while not pings or pings[-1] != 200:
            assert container.running(), container.logs()[-3000:]
            assert time.monotonic() - started < START_TIMEOUT_S, container.logs()[-3000:]
            try:
                status = requests.get(f"{url}/ping", timeout=10).status_code
            except requests.ConnectionError:
                status = 0
            if status and (not pings or pings[-1] != status):
                pings.append(status)
            time.sleep(0.1)
        FIGURES.values["load-balancing mode, docker run to /ping 200"] = (
            f"{time.monotonic() - started:.0f} s"
        )
        assert pings == [204, 200]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=demo_model.SERVED_NAME,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
            stream=True,
        )
        pieces = [choice.delta.content or "" for event in stream for choice in event.choices]
        assert len(pieces) > 2 and "Paris" in "".join(pieces), pieces
        docker("stop", name)
        assert container.exit_code() == 0, container.logs()[-3000:]
        assert "exiting with code 0" in container.logs()
    except BaseException:
        print(container.logs()[-5000:])
        raise
    finally:
        container.remove()
