"""Settings -> vLLM ``AsyncEngineArgs``: one pure function, nothing else."""

from __future__ import annotations

from typing import get_args

from vllm import AsyncEngineArgs
from vllm.model_executor.layers.quantization import QuantizationMethods

from vllm_worker.errors import SettingsError
from vllm_worker.settings import Settings


def build_engine_args(settings: Settings) -> AsyncEngineArgs:
    """The engine arguments for ``settings``; raises ``SettingsError`` for values vLLM refuses."""
    quantization_methods = get_args(QuantizationMethods)
    if settings.quantization is not None and settings.quantization not in quantization_methods:
        raise SettingsError(
            f"QUANTIZATION={settings.quantization!r} is invalid: must be one of "
            f"{', '.join(quantization_methods)}"
        )
    return AsyncEngineArgs(
        model=settings.model_name,
        revision=settings.model_revision,
        # None: vLLM uses the model's own path and revision (and finds it in a baked,
        # offline cache; the name alone would be looked up at `main`).
        tokenizer=settings.tokenizer_name,
        tokenizer_revision=settings.tokenizer_revision,
        trust_remote_code=settings.trust_remote_code,
        download_dir=settings.download_dir,
        load_format=settings.load_format,
        quantization=settings.quantization,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        seed=settings.seed,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        kv_cache_dtype=settings.kv_cache_dtype,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        enforce_eager=settings.enforce_eager,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        block_size=settings.block_size,
        max_logprobs=settings.max_logprobs,
        # The worker logs one line per job itself; vLLM's periodic stats and
        # per-request logs would print prompts and flood the RunPod log.
        disable_log_stats=True,
        enable_log_requests=False,
    )
