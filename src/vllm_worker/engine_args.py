"""Settings -> vLLM ``AsyncEngineArgs``: one pure function, and the checks vLLM's own
registries allow before the engine starts (quantization methods, tool and reasoning
parsers, structured output backends, ``ENGINE_ARGS``' field names)."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

from pydantic import ValidationError
from vllm import AsyncEngineArgs
from vllm.config import StructuredOutputsConfig
from vllm.config.structured_outputs import StructuredOutputsBackend
from vllm.model_executor.layers.quantization import QuantizationMethods

from vllm_worker.errors import SettingsError
from vllm_worker.settings import Settings

ENGINE_ARGS_DOCS = "https://docs.vllm.ai/en/v0.32.0/configuration/engine_args/"
# Set by the worker whatever the settings: it logs one line per job itself; vLLM's
# periodic stats and per-request logs would print prompts and flood the RunPod log.
_FIXED = {"disable_log_stats": True, "enable_log_requests": False}


def dedicated_args(settings: Settings) -> dict[str, tuple[str, Any]]:
    """Each engine argument a setting of its own sets: ``{field: (VARIABLE, value)}``."""
    return {
        "model": ("MODEL_NAME", settings.model_name),
        "revision": ("MODEL_REVISION", settings.model_revision),
        # None: vLLM uses the model's own path and revision (and finds it in a baked,
        # offline cache; the name alone would be looked up at `main`).
        "tokenizer": ("TOKENIZER_NAME", settings.tokenizer_name),
        "tokenizer_revision": ("TOKENIZER_REVISION", settings.tokenizer_revision),
        "trust_remote_code": ("TRUST_REMOTE_CODE", settings.trust_remote_code),
        "download_dir": ("DOWNLOAD_DIR", settings.download_dir),
        "load_format": ("LOAD_FORMAT", settings.load_format),
        "quantization": ("QUANTIZATION", settings.quantization),
        "dtype": ("DTYPE", settings.dtype),
        "max_model_len": ("MAX_MODEL_LEN", settings.max_model_len),
        "seed": ("SEED", settings.seed),
        "gpu_memory_utilization": ("GPU_MEMORY_UTILIZATION", settings.gpu_memory_utilization),
        "kv_cache_memory_bytes": ("KV_CACHE_MEMORY_BYTES", settings.kv_cache_memory_bytes),
        "kv_cache_dtype": ("KV_CACHE_DTYPE", settings.kv_cache_dtype),
        "tensor_parallel_size": ("TENSOR_PARALLEL_SIZE", settings.tensor_parallel_size),
        "pipeline_parallel_size": ("PIPELINE_PARALLEL_SIZE", settings.pipeline_parallel_size),
        "enforce_eager": ("ENFORCE_EAGER", settings.enforce_eager),
        "max_num_seqs": ("MAX_NUM_SEQS", settings.max_num_seqs),
        "max_num_batched_tokens": ("MAX_NUM_BATCHED_TOKENS", settings.max_num_batched_tokens),
        "enable_prefix_caching": ("ENABLE_PREFIX_CACHING", settings.enable_prefix_caching),
        "block_size": ("BLOCK_SIZE", settings.block_size),
        "max_logprobs": ("MAX_LOGPROBS", settings.max_logprobs),
        "enable_lora": ("LORA_MODULES", bool(settings.lora_modules)),
        "max_loras": ("MAX_LORAS", settings.max_loras),
        "max_lora_rank": ("MAX_LORA_RANK", settings.max_lora_rank),
        # The engine's structured output waits for the reasoning's end (as --reasoning-parser
        # does); the OpenAI routes split the reasoning from the answer with the same parser.
        "reasoning_parser": ("REASONING_PARSER", settings.reasoning_parser or ""),
    }


def build_engine_args(settings: Settings) -> AsyncEngineArgs:
    """The engine arguments for ``settings``; ``SettingsError`` for values vLLM refuses."""
    _check_quantization(settings)
    check_parsers(settings)
    dedicated = dedicated_args(settings)
    extra = dict(settings.engine_args or {})
    structured = _structured_outputs_config(settings, extra.pop("structured_outputs_config", {}))
    extra = _checked_extra(extra, dedicated)
    kwargs = {name: value for name, (_, value) in dedicated.items()} | extra | _FIXED
    kwargs["structured_outputs_config"] = structured
    try:
        return AsyncEngineArgs(**kwargs)
    except (TypeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise SettingsError(f"ENGINE_ARGS is invalid: {first_line}") from None


def _structured_outputs_config(settings: Settings, options: Any) -> StructuredOutputsConfig:
    """``STRUCTURED_OUTPUTS_BACKEND``, with ``ENGINE_ARGS``' other structured output options
    (``{"structured_outputs_config": {"disable_any_whitespace": true}}``)."""
    backends = get_args(StructuredOutputsBackend)
    if settings.structured_outputs_backend not in backends:
        raise SettingsError(
            f"STRUCTURED_OUTPUTS_BACKEND={settings.structured_outputs_backend!r} is invalid: "
            f"must be one of {', '.join(backends)}"
        )
    if not isinstance(options, dict) or "backend" in options:
        raise SettingsError(
            "ENGINE_ARGS: 'structured_outputs_config' must be an object of vLLM's options "
            "without 'backend' (set by STRUCTURED_OUTPUTS_BACKEND)"
        )
    try:
        return StructuredOutputsConfig(backend=settings.structured_outputs_backend, **options)
    except ValidationError as error:
        detail = error.errors(include_url=False)[0]
        where = ".".join(map(str, detail["loc"]))
        message = detail["msg"].removeprefix("Value error, ")
        raise SettingsError(
            f"ENGINE_ARGS: 'structured_outputs_config' is invalid: {where + ': ' if where else ''}"
            f"{message} (STRUCTURED_OUTPUTS_BACKEND={settings.structured_outputs_backend!r})"
        ) from None


def _check_quantization(settings: Settings) -> None:
    methods = get_args(QuantizationMethods)
    if settings.quantization is not None and settings.quantization not in methods:
        raise SettingsError(
            f"QUANTIZATION={settings.quantization!r} is invalid: must be one of "
            f"{', '.join(methods)}"
        )


def check_parsers(settings: Settings) -> None:
    """``TOOL_CALL_PARSER`` and ``REASONING_PARSER`` name parsers vLLM has registered, and
    ``ENABLE_AUTO_TOOL_CHOICE`` has a tool parser (as vLLM requires)."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for variable, name, registered in (
        ("TOOL_CALL_PARSER", settings.tool_call_parser, ToolParserManager.list_registered()),
        ("REASONING_PARSER", settings.reasoning_parser, ReasoningParserManager.list_registered()),
    ):
        if name is not None and name not in registered:
            raise SettingsError(
                f"{variable}={name!r} is invalid: must be one of vLLM's: {', '.join(registered)}"
            )
    if settings.enable_auto_tool_choice and settings.tool_call_parser is None:
        raise SettingsError(
            "ENABLE_AUTO_TOOL_CHOICE=true needs TOOL_CALL_PARSER: the parser that reads the "
            "model's tool calls (e.g. hermes, llama3_json)"
        )
    if settings.tool_call_parser is not None and not settings.enable_auto_tool_choice:
        # vLLM 0.32 builds the tool parser only with auto tool choice on (ParserManager.
        # get_tool_parser): without it, every tool_choice but "none" would be refused.
        raise SettingsError(
            f"TOOL_CALL_PARSER={settings.tool_call_parser!r} needs ENABLE_AUTO_TOOL_CHOICE="
            "true: vLLM parses tool calls only with auto tool choice on"
        )


def _checked_extra(extra: dict[str, Any], dedicated: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """``ENGINE_ARGS``, once every field is one of ``AsyncEngineArgs`` and none is one a
    dedicated setting (or the worker itself) already sets."""
    known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise SettingsError(
            f"ENGINE_ARGS: {', '.join(map(repr, unknown))} is not an argument of vLLM's "
            f"engine (AsyncEngineArgs); its arguments: {ENGINE_ARGS_DOCS}"
        )
    for name in sorted(extra):
        if name in dedicated:
            variable = dedicated[name][0]
            raise SettingsError(f"ENGINE_ARGS: {name!r} is set by {variable}: set it there")
        if name in _FIXED:
            raise SettingsError(f"ENGINE_ARGS: {name!r} is set by the worker itself")
    return extra
