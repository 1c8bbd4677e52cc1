"""Settings -> AsyncEngineArgs: one pure function."""

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
