"""`src/handler.py --test_input ...` and `test_input.json`: real runs, real exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO_ROOT

HANDLER = REPO_ROOT / "src" / "handler.py"
ENGINE_RUN_TIMEOUT_S = 300


def run_handler(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = ENGINE_RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HANDLER), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def printed_chunks(stdout: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.split(": ", 1)[1])
        for line in stdout.splitlines()
        if line.startswith("chunk ")
    ]


def assert_clean_exit(stderr: str) -> None:
    """The run ends without a traceback (vLLM's engine shut down before interpreter exit)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Exception ignored" not in stderr, stderr[-3000:]


def job_result(stdout: str) -> dict[str, Any]:
    (line,) = [line for line in stdout.splitlines() if line.startswith("Job result: ")]
    return dict(json.loads(line.removeprefix("Job result: ")))


def test_test_input_argument_runs_the_job_and_prints_each_chunk(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    request = {
        "input": {
            "prompt": "Tell me a story",
            "sampling_params": {"max_tokens": 24, "ignore_eos": True},
        }
    }
    result = run_handler(worker_env, tmp_path, "--test_input", json.dumps(request))
    assert result.returncode == 0, result.stderr[-3000:]
    chunks = printed_chunks(result.stdout)
    assert len(chunks) >= 2
    assert all(chunk["text"][0].startswith("Tell me a story") for chunk in chunks)
    output = job_result(result.stdout)["output"]
    assert output == chunks[-1]
    assert output["usage"]["completion_tokens"] == 24
    assert "job local-test done: prompt_tokens=" in result.stderr  # the per-job log line
    assert "Tell me a story" not in result.stderr  # never the prompt in the log at INFO
    assert_clean_exit(result.stderr)


def test_test_input_json_in_the_working_directory_is_run(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    shutil.copy(REPO_ROOT / "test_input.json", tmp_path / "test_input.json")
    # And any engine argument: the docs' example, speculative decoding by n-gram lookup.
    speculative = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    env = {
        **worker_env,
        "STREAM_MIN_INTERVAL_MS": "50",
        "ENGINE_ARGS": json.dumps({"speculative_config": speculative}),
    }
    result = run_handler(env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # vLLM's engine logs the configuration it runs with.
    assert "speculative_config=SpeculativeConfig(method='ngram'" in result.stderr
    prompt = json.loads((tmp_path / "test_input.json").read_text())["input"]["prompt"]
    output = job_result(result.stdout)["output"]
    assert output["text"][0].startswith(prompt)
    assert output["finish_reason"][0] in {"stop", "length"}
    assert printed_chunks(result.stdout)[-1] == output
    assert_clean_exit(result.stderr)


def test_a_job_the_engine_refuses_exits_non_zero(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    request = {"input": {"prompt": "Hi there", "sampling_params": {"stop_token_ids": [99_999]}}}
    result = run_handler(worker_env, tmp_path, "--test_input", json.dumps(request))
    assert result.returncode == 1
    assert "Job failed: invalid_input: sampling_params.stop_token_ids:" in result.stderr
    assert "Job result" not in result.stdout


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        (
            '{"input": {"prompt": "x", "sampling_params": {"temperature": 9}}}',
            "Job failed: invalid_input: sampling_params.temperature: Input should be less than",
        ),
        ('{"input": {"promt": "x"}}', "promt: unknown field"),
        ("{not json", "Job failed: invalid_input: --test_input is not valid JSON"),
        ('{"prompt": "x"}', 'must be a JSON object {"input": {...}}'),
        (
            '{"input": {"openai_route": "/v1/embeddings"}}',
            "Job failed: invalid_input: openai_route: '/v1/embeddings' is not served",
        ),
    ],
)
def test_bad_input_fails_before_the_engine_starts(
    worker_env: dict[str, str], tmp_path: Path, argument: str, expected: str
) -> None:
    result = run_handler(worker_env, tmp_path, "--test_input", argument, timeout=60)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "starting the engine" not in result.stderr


def test_no_job_at_all_is_an_error(worker_env: dict[str, str], tmp_path: Path) -> None:
    result = run_handler(worker_env, tmp_path, timeout=60)
    assert result.returncode == 1
    assert "no job to run: pass --test_input" in result.stderr


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            {"GPU_MEMORY_UTILIZATION": "2"},
            "GPU_MEMORY_UTILIZATION='2' is invalid: must be less than or equal to 1",
        ),
        (
            {"LORA_MODULES": "alpha=/nowhere/adapter"},
            "LORA_MODULES: alpha=/nowhere/adapter: no adapter_config.json there",
        ),
        (
            {"ENGINE_ARGS": '{"max_model_len": 64}'},
            "ENGINE_ARGS: 'max_model_len' is set by MAX_MODEL_LEN: set it there",
        ),
    ],
    # One of each kind (a value's range, a file, vLLM's own rules); every message is
    # unit-tested (tests/unit/test_settings.py, test_engine_args.py).
    ids=["range", "LoRA folder", "engine args"],
)
def test_an_invalid_setting_stops_start_up_in_one_line(
    worker_env: dict[str, str], tmp_path: Path, setting: dict[str, str], expected: str
) -> None:
    env = {**worker_env, **setting}
    result = run_handler(env, tmp_path, "--test_input", '{"input": {"prompt": "x"}}', timeout=120)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert line.startswith(f"vllm-worker: cannot start: {expected}"), line
    assert "Traceback" not in result.stderr


def test_an_openai_route_input_runs_through_the_openai_routes(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    request = {
        "input": {
            "openai_route": "/v1/chat/completions",
            "openai_input": {
                "model": Path(worker_env["MODEL_NAME"]).name,
                "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 8,
                "stream": True,
            },
        }
    }
    result = run_handler(worker_env, tmp_path, "--test_input", json.dumps(request))
    assert result.returncode == 0, result.stderr[-3000:]
    events = "".join(
        json.loads(line.split(": ", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("chunk ")
    )
    assert events.startswith('data: {"id":"chatcmpl-')
    assert events.endswith("data: [DONE]\n\n")
