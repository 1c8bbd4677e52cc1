"""Settings -> AsyncEngineArgs: one pure function."""

import json
import re

import pytest

from vllm_worker.engine_args import build_engine_args
from vllm_worker.errors import SettingsError
from vllm_worker.settings import Settings


def test_defaults_map_to_llama2_engine_args() -> None:
    args = build_engine_args(Settings.from_env({}))
    assert args.model == "meta-llama/Llama-2-7b-chat-hf"
    assert args.tokenizer is None  # vLLM then loads the model's own tokenizer
    assert args.max_model_len == 4096
    assert args.trust_remote_code is False
    assert args.enable_prefix_caching is True
    assert args.disable_log_stats is True  # no prompts or periodic stats in the log


def test_every_engine_setting_reaches_the_engine_args() -> None:
    settings = Settings.from_env(
        {
            "MODEL_NAME": "org/model",
            "MODEL_REVISION": "abc123",
            "TOKENIZER_NAME": "org/tokenizer",
            "TOKENIZER_REVISION": "def456",
            "TRUST_REMOTE_CODE": "1",
            "DOWNLOAD_DIR": "/runpod-volume/models",
            "LOAD_FORMAT": "safetensors",
            "QUANTIZATION": "awq",
            "DTYPE": "half",
            "MAX_MODEL_LEN": "2048",
            "SEED": "7",
            "GPU_MEMORY_UTILIZATION": "0.8",
            "KV_CACHE_MEMORY_BYTES": "1000000",
            "KV_CACHE_DTYPE": "fp8",
            "TENSOR_PARALLEL_SIZE": "2",
            "PIPELINE_PARALLEL_SIZE": "2",
            "ENFORCE_EAGER": "true",
            "MAX_NUM_SEQS": "64",
            "MAX_NUM_BATCHED_TOKENS": "8192",
            "ENABLE_PREFIX_CACHING": "false",
            "BLOCK_SIZE": "32",
            "MAX_LOGPROBS": "5",
        }
    )
    args = build_engine_args(settings)
    assert (args.model, args.revision) == ("org/model", "abc123")
    assert (args.tokenizer, args.tokenizer_revision) == ("org/tokenizer", "def456")
    assert args.trust_remote_code is True
    assert args.download_dir == "/runpod-volume/models"
    assert args.load_format == "safetensors"
    assert args.quantization == "awq"
    assert args.dtype == "half"
    assert args.max_model_len == 2048
    assert args.seed == 7
    assert args.gpu_memory_utilization == 0.8
    assert args.kv_cache_memory_bytes == 1_000_000
    assert args.kv_cache_dtype == "fp8"
    assert args.tensor_parallel_size == 2
    assert args.pipeline_parallel_size == 2
    assert args.enforce_eager is True
    assert args.max_num_seqs == 64
    assert args.max_num_batched_tokens == 8192
    assert args.enable_prefix_caching is False
    assert args.block_size == 32
    assert args.max_logprobs == 5


def test_unknown_quantization_method_names_the_variable() -> None:
    settings = Settings.from_env({"QUANTIZATION": "zip"})
    with pytest.raises(SettingsError, match=r"QUANTIZATION='zip' is invalid: must be one of .*awq"):
        build_engine_args(settings)


def test_engine_args_pass_any_other_engine_argument() -> None:
    speculative = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    settings = Settings.from_env(
        {
            "ENGINE_ARGS": json.dumps(
                {"speculative_config": speculative, "long_prefill_token_threshold": 256}
            )
        }
    )
    args = build_engine_args(settings)
    assert args.speculative_config == speculative
    assert args.long_prefill_token_threshold == 256


def test_an_unknown_engine_argument_stops_start_up_naming_it() -> None:
    settings = Settings.from_env({"ENGINE_ARGS": '{"speculative_confg": {}}'})
    with pytest.raises(SettingsError) as raised:
        build_engine_args(settings)
    message = str(raised.value)
    assert message.startswith("ENGINE_ARGS: 'speculative_confg' is not an argument of vLLM's")
    assert "docs.vllm.ai" in message


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("max_model_len", "ENGINE_ARGS: 'max_model_len' is set by MAX_MODEL_LEN: set it there"),
        ("model", "ENGINE_ARGS: 'model' is set by MODEL_NAME: set it there"),
        ("disable_log_stats", "ENGINE_ARGS: 'disable_log_stats' is set by the worker itself"),
    ],
)
def test_an_engine_argument_a_setting_owns_is_a_conflict(field: str, message: str) -> None:
    settings = Settings.from_env({"ENGINE_ARGS": json.dumps({field: 1})})
    with pytest.raises(SettingsError, match=re.escape(message)):
        build_engine_args(settings)


def test_engine_args_must_be_a_json_object() -> None:
    for value in ("[1]", "{not json", '"a string"'):
        with pytest.raises(SettingsError, match=r"^ENGINE_ARGS=.* is invalid: must be a JSON"):
            Settings.from_env({"ENGINE_ARGS": value})


def test_lora_settings_reach_the_engine_args() -> None:
    settings = Settings.from_env(
        {"LORA_MODULES": "sql=org/sql-lora", "MAX_LORAS": "2", "MAX_LORA_RANK": "32"}
    )
    args = build_engine_args(settings)
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 2, 32)
    assert build_engine_args(Settings.from_env({})).enable_lora is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOOL_CALL_PARSER": "no-such"}, r"^TOOL_CALL_PARSER='no-such' is invalid: .*hermes"),
        ({"REASONING_PARSER": "no-such"}, r"^REASONING_PARSER='no-such' is invalid: .*deepseek_r1"),
        (
            {"ENABLE_AUTO_TOOL_CHOICE": "true"},
            r"^ENABLE_AUTO_TOOL_CHOICE=true needs TOOL_CALL_PARSER",
        ),
        (
            {"TOOL_CALL_PARSER": "hermes"},
            r"^TOOL_CALL_PARSER='hermes' needs ENABLE_AUTO_TOOL_CHOICE=true",
        ),
    ],
)
def test_tool_and_reasoning_parsers_are_vllms_own(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build_engine_args(Settings.from_env(env))


def test_a_known_tool_parser_passes() -> None:
    settings = Settings.from_env({"ENABLE_AUTO_TOOL_CHOICE": "1", "TOOL_CALL_PARSER": "hermes"})
    build_engine_args(settings)


@pytest.mark.parametrize("backend", ["auto", "xgrammar", "guidance", "outlines"])
def test_the_structured_output_backend_is_vllms_own(backend: str) -> None:
    args = build_engine_args(Settings.from_env({"STRUCTURED_OUTPUTS_BACKEND": backend}))
    assert args.structured_outputs_config.backend == backend


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"STRUCTURED_OUTPUTS_BACKEND": "grammarly"},
            r"^STRUCTURED_OUTPUTS_BACKEND='grammarly' is invalid: must be one of auto, xgrammar, ",
        ),
        (
            {"ENGINE_ARGS": '{"structured_outputs_config": {"backend": "guidance"}}'},
            r"^ENGINE_ARGS: 'structured_outputs_config' must be an object of vLLM's options "
            r"without 'backend' \(set by STRUCTURED_OUTPUTS_BACKEND\)",
        ),
        (
            # vLLM's own rule, in one line naming the backend it was checked with.
            {"ENGINE_ARGS": '{"structured_outputs_config": {"disable_any_whitespace": true}}'},
            r"^ENGINE_ARGS: 'structured_outputs_config' is invalid: disable_any_whitespace is "
            r"only supported for xgrammar and guidance .*\(STRUCTURED_OUTPUTS_BACKEND='auto'\)$",
        ),
    ],
)
def test_a_structured_output_setting_vllm_refuses_stops_start_up(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        build_engine_args(Settings.from_env(env))


def test_engine_args_add_structured_output_options_to_the_backend() -> None:
    env = {
        "STRUCTURED_OUTPUTS_BACKEND": "xgrammar",
        "ENGINE_ARGS": '{"structured_outputs_config": {"disable_any_whitespace": true}}',
    }
    config = build_engine_args(Settings.from_env(env)).structured_outputs_config
    assert (config.backend, config.disable_any_whitespace) == ("xgrammar", True)
