"""Start-up: run mode selection and refusing to start on bad settings."""

import pytest

from vllm_worker.main import RunMode, choose_mode, main
from vllm_worker.settings import Settings


def test_production_when_runpod_gives_a_job_url() -> None:
    settings = Settings.from_env({"RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:1/job-take/$ID?"})
    assert choose_mode([], settings) is RunMode.PRODUCTION
    assert choose_mode(["--test_input", "{}"], settings) is RunMode.PRODUCTION


def test_sdk_api_server_when_asked_for() -> None:
    assert choose_mode(["--rp_serve_api"], Settings.from_env({})) is RunMode.SDK_API_SERVER
    settings = Settings.from_env({"RUNPOD_REALTIME_PORT": "8000"})
    assert choose_mode([], settings) is RunMode.SDK_API_SERVER


def test_local_one_shot_otherwise() -> None:
    assert choose_mode(["--test_input", "{}"], Settings.from_env({})) is RunMode.LOCAL_TEST
    assert choose_mode([], Settings.from_env({})) is RunMode.LOCAL_TEST


def test_bad_setting_stops_start_up_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], environ={"MAX_MODEL_LEN": "lots"}) == 2
    error = capsys.readouterr().err
    assert error.startswith("vllm-worker: cannot start: MAX_MODEL_LEN='lots' is invalid")


def test_a_model_folder_that_is_not_there_stops_start_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([], environ={"MODEL_NAME": "/no/such/model"}) == 2
    error = capsys.readouterr().err
    assert error.startswith("vllm-worker: cannot start: MODEL_NAME='/no/such/model' is invalid")
    assert "no such directory" in error


def test_the_sdk_dev_server_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--rp_serve_api"], environ={}) == 2
    error = capsys.readouterr().err
    assert error.startswith("vllm-worker: cannot start: --rp_serve_api / RUNPOD_REALTIME_PORT:")
    assert "python -m vllm_worker.local_endpoint" in error
    assert main([], environ={"RUNPOD_REALTIME_PORT": "8000"}) == 2


def test_load_balancer_when_the_endpoint_type_says_so() -> None:
    settings = Settings.from_env(
        {"ENDPOINT_TYPE": "load_balancer", "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:1/x"}
    )
    assert choose_mode([], settings) is RunMode.LOAD_BALANCER
