"""The RunPod Hub files: ``.runpod/hub.json``, ``.runpod/tests.json``, ``.runpod/handler.py``.

Checked against RunPod's Hub publishing guide (docs.runpod.io/hub/publishing-guide: the
fields, which are required, their types and allowed values) and against the worker
itself: every variable the form sets is a setting the worker reads (or a documented
external one), every default and preset parses as the worker parses it, and the Hub's
test job passes the worker's input validation.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import pytest

from helpers import REPO_ROOT
from vllm_worker.model_source import is_offline
from vllm_worker.schema import parse_job_input
from vllm_worker.settings import Settings

HUB_JSON = REPO_ROOT / ".runpod" / "hub.json"
TESTS_JSON = REPO_ROOT / ".runpod" / "tests.json"

CATEGORIES = {"audio", "embedding", "language", "video", "image"}
INPUT_TYPES = {"string", "number", "boolean", "huggingface"}
# Variables the form may set that are not the worker's settings but are read by the
# libraries it runs; each must be explained in the settings' page (docs/settings.md).
EXTERNAL = {"HF_TOKEN"}
CUDA_VERSION = re.compile(r"^\d+\.\d+$")


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def hub() -> dict[str, Any]:
    data = load(HUB_JSON)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def tests_json() -> dict[str, Any]:
    data = load(TESTS_JSON)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def env_entries(hub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = hub["config"]["env"]
    keys = [entry["key"] for entry in entries]
    assert len(keys) == len(set(keys)), "an env key is defined twice"
    return {entry["key"]: entry for entry in entries}


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def as_env_value(entry: dict[str, Any], value: Any) -> str:
    """The string the endpoint's environment gets for ``value`` of this form field."""
    field = entry.get("input", {})
    if field.get("type") == "boolean":
        assert isinstance(value, bool), (entry["key"], value)
        return str(field["trueValue"] if value else field["falseValue"])
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- hub.json: the guide's schema ------------------------------------------------------------


def test_hub_json_has_the_guides_general_metadata(hub: dict[str, Any]) -> None:
    assert {"title", "description", "type", "category", "config"} <= hub.keys()
    assert set(hub) <= {"title", "description", "type", "category", "iconUrl", "config"}
    assert isinstance(hub["title"], str) and hub["title"].strip()
    assert isinstance(hub["description"], str) and hub["description"].strip()
    assert hub["type"] == "serverless"
    assert hub["category"] in CATEGORIES
    if "iconUrl" in hub:
        url = urlsplit(hub["iconUrl"])
        assert url.scheme == "https" and url.netloc, hub["iconUrl"]


def test_hub_json_config_runs_on_one_gpu_of_the_listed_pools(hub: dict[str, Any]) -> None:
    config = hub["config"]
    allowed = {
        "runsOn",
        "containerDiskInGb",
        "cpuFlavor",
        "gpuCount",
        "gpuIds",
        "allowedCudaVersions",
        "env",
        "presets",
    }
    assert set(config) <= allowed
    assert config["runsOn"] == "GPU"
    disk = config["containerDiskInGb"]
    assert isinstance(disk, int) and not isinstance(disk, bool) and disk >= 20
    assert config["gpuCount"] == 1  # TENSOR_PARALLEL_SIZE defaults to 1
    pools = [part.strip() for part in config["gpuIds"].split(",")]
    assert pools and all(pools), config["gpuIds"]
    versions = config["allowedCudaVersions"]
    assert versions and all(isinstance(v, str) and CUDA_VERSION.match(v) for v in versions)


def test_every_env_entry_follows_the_guide(env_entries: dict[str, dict[str, Any]]) -> None:
    for key, entry in env_entries.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), key
        assert ("value" in entry) != ("input" in entry), f"{key}: exactly one of value/input"
        if "value" in entry:
            assert isinstance(entry["value"], str), key
            continue
        field = entry["input"]
        assert field["type"] in INPUT_TYPES, key
        assert isinstance(field["name"], str) and field["name"].strip(), key
        assert isinstance(field["description"], str) and field["description"].strip(), key
        assert isinstance(field.get("advanced", False), bool), key
        if field["type"] == "boolean":
            assert isinstance(field["default"], bool), key
            assert isinstance(field["trueValue"], str) and isinstance(field["falseValue"], str)
        if field["type"] == "number":
            numbers = [field[k] for k in ("min", "default", "max") if k in field]
            assert all(isinstance(n, int | float) for n in numbers), key
            assert numbers == sorted(numbers), f"{key}: min <= default <= max"
        if "options" in field:
            values = [option["value"] for option in field["options"]]
            assert all(isinstance(o["label"], str) and o["label"] for o in field["options"])
            assert all(isinstance(v, str) for v in values) and len(set(values)) == len(values)
            if "default" in field:
                assert field["default"] in values, key


def test_the_main_settings_are_on_the_form(env_entries: dict[str, dict[str, Any]]) -> None:
    for key in (
        "MODEL_NAME",
        "MAX_MODEL_LEN",
        "DTYPE",
        "GPU_MEMORY_UTILIZATION",
        "MAX_CONCURRENCY",
        "DEFAULT_MAX_TOKENS",
        "HF_TOKEN",
        "QUANTIZATION",
        "ENFORCE_EAGER",
        "TRUST_REMOTE_CODE",
    ):
        assert key in env_entries, key
        assert env_entries[key]["input"].get("advanced", False) is False, key
    assert env_entries["MODEL_NAME"]["input"]["type"] == "huggingface"
    assert "options" in env_entries["QUANTIZATION"]["input"]
    # A token is never given a value in a file that is published.
    assert "default" not in env_entries["HF_TOKEN"]["input"]
    assert "RUNPOD_SECRET_" in env_entries["HF_TOKEN"]["input"]["description"]


# --- hub.json against the worker ------------------------------------------------------------


def test_every_env_key_is_a_setting_or_a_documented_external_variable(
    env_entries: dict[str, dict[str, Any]],
) -> None:
    page = (REPO_ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    for key in env_entries:
        if key in EXTERNAL:
            assert f"`{key}`" in page, f"{key} is not explained in docs/settings.md"
        else:
            assert key in settings_variables(), f"{key} is not a setting of the worker"


def test_the_forms_defaults_are_the_workers_defaults(
    env_entries: dict[str, dict[str, Any]],
) -> None:
    environ = {
        key: as_env_value(entry, entry["input"]["default"])
        for key, entry in env_entries.items()
        if "input" in entry and "default" in entry["input"]
    }
    parsed = Settings.from_env(environ)  # raises if a default does not parse
    defaults = Settings.from_env({})
    for key in environ:
        name = key.lower()
        if name == "hf_hub_offline":
            assert is_offline(parsed) == is_offline(defaults)
        else:
            assert getattr(parsed, name) == getattr(defaults, name), key


def test_every_option_and_number_bound_parses_as_the_worker_parses_it(
    env_entries: dict[str, dict[str, Any]],
) -> None:
    for key, entry in env_entries.items():
        if key not in settings_variables() or "input" not in entry:
            continue
        field = entry["input"]
        candidates = [option["value"] for option in field.get("options", ())]
        candidates += [field[bound] for bound in ("min", "max") if bound in field]
        if field["type"] == "boolean":
            candidates += [True, False]
        for value in candidates:
            Settings.from_env({key: as_env_value(entry, value)})


def test_quantization_options_are_vllms_methods(env_entries: dict[str, dict[str, Any]]) -> None:
    from vllm.model_executor.layers.quantization import QuantizationMethods

    values = {option["value"] for option in env_entries["QUANTIZATION"]["input"]["options"]}
    assert "none" in values
    assert Settings.from_env({"QUANTIZATION": "none"}).quantization is None
    assert values - {"none"} <= set(get_args(QuantizationMethods))


def test_presets_set_form_variables_to_values_that_parse(
    hub: dict[str, Any], env_entries: dict[str, dict[str, Any]]
) -> None:
    presets = hub["config"]["presets"]
    assert presets
    for preset in presets:
        assert isinstance(preset["name"], str) and preset["name"].strip()
        defaults = preset["defaults"]
        assert defaults and set(defaults) <= set(env_entries), preset["name"]
        environ = {key: as_env_value(env_entries[key], value) for key, value in defaults.items()}
        settings = Settings.from_env(environ)
        assert settings.model_name == defaults["MODEL_NAME"]


# --- tests.json ------------------------------------------------------------------------------


def test_tests_json_follows_the_guide(tests_json: dict[str, Any], hub: dict[str, Any]) -> None:
    assert set(tests_json) == {"tests", "config"}
    assert tests_json["tests"]
    for case in tests_json["tests"]:
        assert set(case) <= {"name", "input", "timeout"}
        assert isinstance(case["name"], str) and case["name"].strip()
        assert isinstance(case["input"], dict)
        timeout = case["timeout"]
        assert isinstance(timeout, int) and not isinstance(timeout, bool)
        assert timeout >= 60_000, "milliseconds: a cold start loads the model first"
    config = tests_json["config"]
    assert set(config) <= {"gpuTypeId", "gpuCount", "cpuFlavor", "env", "allowedCudaVersions"}
    assert isinstance(config["gpuTypeId"], str) and config["gpuTypeId"].startswith("NVIDIA ")
    assert config["gpuCount"] == 1
    assert config["allowedCudaVersions"] == hub["config"]["allowedCudaVersions"]
    for variable in config["env"]:
        assert set(variable) == {"key", "value"} and isinstance(variable["value"], str)


def test_the_test_endpoint_runs_a_small_model_with_settings_that_parse(
    tests_json: dict[str, Any],
) -> None:
    environ = {v["key"]: v["value"] for v in tests_json["config"]["env"]}
    for key in environ:
        assert key in settings_variables() | EXTERNAL, key
    settings = Settings.from_env(environ)
    assert settings.model_name != Settings.from_env({}).model_name  # not the 13.5 GB default
    # A baked image is offline: the test model must be downloadable.
    assert not is_offline(settings)
    assert settings.model_revision is None and settings.tokenizer_name is None


def test_the_test_job_is_the_seed_request_made_short_and_passes_validation(
    tests_json: dict[str, Any],
) -> None:
    environ = {v["key"]: v["value"] for v in tests_json["config"]["env"]}
    settings = Settings.from_env(environ)
    seed = load(REPO_ROOT / "test_input.json")["input"]
    for case in tests_json["tests"]:
        job = parse_job_input(case["input"], max_n=settings.max_n)  # raises if invalid
        assert job.prompt == seed["prompt"]
        assert job.stream is False
        sampling = dict(case["input"]["sampling_params"])
        assert 1 <= sampling.pop("max_tokens") <= 64
        assert sampling == {k: v for k, v in seed["sampling_params"].items() if k != "max_tokens"}


# --- the files the Hub looks for ----------------------------------------------------------------


def test_the_hub_finds_a_handler_a_dockerfile_and_a_readme() -> None:
    # The guide: handler.py, Dockerfile and README.md in .runpod/ or the root; .runpod/
    # wins. No .runpod/Dockerfile or README.md: the Hub builds and shows the root ones.
    for name in ("handler.py", "Dockerfile", "README.md"):
        assert (REPO_ROOT / ".runpod" / name).is_file() or (REPO_ROOT / name).is_file(), name
    assert not (REPO_ROOT / ".runpod" / "Dockerfile").exists()
    assert not (REPO_ROOT / ".runpod" / "README.md").exists()


def code_of(path: Path) -> str:
    """The module's code without its docstring (comments are not in the tree)."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def test_the_hubs_handler_is_the_workers_entry_script_and_nothing_more() -> None:
    assert code_of(REPO_ROOT / ".runpod" / "handler.py") == code_of(
        REPO_ROOT / "src" / "handler.py"
    )


def test_the_hubs_handler_runs_the_worker(tmp_path: Path) -> None:
    # Bad input fails before anything loads: the worker's own message and exit code.
    job = '{"input": {"prompt": "x", "sampling_params": {"temperature": 9}}}'
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / ".runpod" / "handler.py"), "--test_input", job],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Job failed: invalid_input: sampling_params.temperature:" in result.stderr
