"""Settings from the environment: defaults, parsing, and start-up errors that name the variable."""

import pytest

from vllm_worker.errors import SettingsError
from vllm_worker.settings import Settings


def test_defaults_serve_llama2_7b_chat() -> None:
    settings = Settings.from_env({})
    assert settings.model_name == "meta-llama/Llama-2-7b-chat-hf"
    assert settings.tokenizer_name is None
    assert settings.max_model_len == 4096
    assert settings.default_max_tokens > 16  # vLLM's own 16 truncates every answer
    assert settings.trust_remote_code is False
    assert settings.dtype == "auto"
    assert settings.log_level == "INFO"


def test_values_are_parsed_from_strings() -> None:
    settings = Settings.from_env(
        {
            "MODEL_NAME": "/models/tiny",
            "TOKENIZER_NAME": "/models/tok",
            "MAX_MODEL_LEN": "2048",
            "GPU_MEMORY_UTILIZATION": "0.5",
            "ENFORCE_EAGER": "true",
            "ENABLE_PREFIX_CACHING": "0",
            "TRUST_REMOTE_CODE": "no",
            "DTYPE": "Float32",
            "LOG_LEVEL": "debug",
            "STREAM_MIN_INTERVAL_MS": "0",
            "QUANTIZATION": "awq",
        }
    )
    assert settings.model_name == "/models/tiny"
    assert settings.tokenizer_name == "/models/tok"
    assert settings.max_model_len == 2048
    assert settings.gpu_memory_utilization == 0.5
    assert settings.enforce_eager is True
    assert settings.enable_prefix_caching is False
    assert settings.trust_remote_code is False
    assert settings.dtype == "float32"
    assert settings.log_level == "DEBUG"
    assert settings.stream_min_interval_ms == 0
    assert settings.quantization == "awq"


def test_empty_and_blank_variables_count_as_unset() -> None:
    settings = Settings.from_env({"MAX_MODEL_LEN": "", "QUANTIZATION": "  ", "DTYPE": ""})
    assert settings.max_model_len == 4096
    assert settings.quantization is None


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "HOME": "/root"}) == Settings.from_env({})


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MAX_MODEL_LEN", "abc", "valid integer"),
        ("MAX_MODEL_LEN", "0", "greater than or equal to 1"),
        ("GPU_MEMORY_UTILIZATION", "1.5", "less than or equal to 1"),
        ("GPU_MEMORY_UTILIZATION", "0", "greater than 0"),
        ("ENFORCE_EAGER", "maybe", "valid boolean"),
        ("DTYPE", "float8", "'auto', 'half'"),
        ("MAX_CONCURRENCY", "-3", "greater than or equal to 1"),
        ("STREAM_MIN_INTERVAL_MS", "-1", "greater than or equal to 0"),
        ("LOG_LEVEL", "loud", "'DEBUG', 'INFO'"),
        ("RUNPOD_REALTIME_PORT", "70000", "less than or equal to 65535"),
        ("LORA_MODULES", "alpha", "name=source pairs"),
        ("LORA_MODULES", "a=x,a=y", "name=source pairs"),
        ("ENGINE_ARGS", "[1]", "JSON object"),
        ("TOOL_STRICT_LEVEL", "always", "'auto', 'function'"),
    ],
)
def test_invalid_value_names_the_variable_and_what_is_allowed(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    message = str(raised.value)
    assert message.startswith(f"{variable}={value!r} is invalid: must be")
    assert expected in message
    assert "\n" not in message


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"MAX_MODEL_LEN": "x", "MAX_NUM_SEQS": "0"})
    assert "MAX_MODEL_LEN" in str(raised.value)
    assert "MAX_NUM_SEQS" in str(raised.value)


def test_settings_are_immutable() -> None:
    settings = Settings.from_env({})
    with pytest.raises(ValueError, match="frozen"):
        settings.max_model_len = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "value", ["load_balancer", "Load Balancer", "load-balancer", "LOAD_BALANCER"]
)
def test_endpoint_type_takes_runpods_names(value: str) -> None:
    assert Settings.from_env({"ENDPOINT_TYPE": value}).endpoint_type == "load_balancer"


def test_load_balancing_defaults_are_runpods() -> None:
    settings = Settings.from_env({})
    assert settings.endpoint_type == "queue"
    assert (settings.port, settings.port_health, settings.health_check_path) == (80, None, "/ping")
    assert settings.max_request_bytes == 30_000_000


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "ENDPOINT_TYPE",
            "lb",
            "ENDPOINT_TYPE='lb' is invalid: must be 'queue' or 'load_balancer'",
        ),
        ("PORT", "70000", "PORT='70000' is invalid: must be less than or equal to 65535"),
        ("PORT_HEALTH", "0", "PORT_HEALTH='0' is invalid: must be greater than or equal to 1"),
        ("HEALTH_CHECK_PATH", "ping", "HEALTH_CHECK_PATH='ping' is invalid"),
        ("MAX_REQUEST_BYTES", "10", "MAX_REQUEST_BYTES='10' is invalid"),
    ],
)
def test_a_bad_load_balancing_setting_names_itself(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: value})
    assert says in str(error.value)
