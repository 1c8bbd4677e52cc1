"""The worker's settings: one typed, immutable object built once from the environment.

Every environment variable the worker reads is a field here, named as the variable in
lower case; nothing else in the package reads ``os.environ``. Defaults serve Llama 2 7B
Chat on one GPU. An empty variable counts as unset (RunPod's endpoint form leaves blank
fields empty). A value that does not parse or is out of range raises ``SettingsError``
naming the variable, the value and what is allowed, and the worker does not start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from vllm_worker.errors import SettingsError

# RunPod refuses a /run job's result over 10 MB; a streaming job's result is all its
# chunks (docs.runpod.io, serverless/endpoints/operation-reference).
RUNPOD_MAX_RESULT_BYTES = 10_000_000

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]

Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HF_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
_HF_FALSE = frozenset({"0", "OFF", "NO", "FALSE"})


class Settings(BaseModel):
    """All settings; see the README's settings table for what each one does."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # --- the model -----------------------------------------------------------------
    model_name: str = Field("meta-llama/Llama-2-7b-chat-hf", min_length=1)
    model_revision: str | None = None
    tokenizer_name: str | None = None
    tokenizer_revision: str | None = None
    trust_remote_code: bool = False
    download_dir: str | None = None
    load_format: str = "auto"
    quantization: str | None = None
    dtype: Dtype = "auto"
    max_model_len: PositiveInt = 4096
    seed: int = 0

    # --- the engine ----------------------------------------------------------------
    gpu_memory_utilization: Fraction = 0.90
    kv_cache_memory_bytes: PositiveInt | None = None
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    enforce_eager: bool = False
    max_num_seqs: PositiveInt = 256
    max_num_batched_tokens: PositiveInt | None = None
    enable_prefix_caching: bool = True
    block_size: PositiveInt | None = None
    max_logprobs: Annotated[int, Field(ge=0)] = 20
    # Any other vLLM engine argument (AsyncEngineArgs' fields), as a JSON object; checked
    # against vLLM's own fields at start-up (engine_args.py).
    engine_args: dict[str, Any] | None = None

    # --- the worker ----------------------------------------------------------------
    max_concurrency: PositiveInt = 64
    # After SIGTERM: how long jobs in flight may still run before they are aborted
    # (lifecycle.py). With the engine's own shutdown after it (about 4 s), it fits
    # Docker's default 10 s between SIGTERM and SIGKILL.
    shutdown_grace_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = 5.0
    default_max_tokens: PositiveInt = 1024
    max_n: Annotated[int, Field(ge=1, le=128)] = 16
    # Characters of text a job's input may hold, checked before it is read (input_size.py);
    # default: what the longest prompt that fits the context can have.
    max_input_chars: PositiveInt | None = None
    # When a job's chunks go (streaming.EmissionClock): the first at once, then gaps that
    # grow with the job's age (x growth), from the shortest to the longest (0: no cap; one
    # below the shortest leaves the shortest); all of a job's intermediate chunks together
    # stay within the byte budget.
    stream_min_interval_ms: Annotated[float, Field(ge=0.0, le=10_000.0)] = 50.0
    stream_interval_growth: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0
    stream_max_interval_ms: Annotated[float, Field(ge=0.0, le=60_000.0)] = 1000.0
    # 4 MB: RunPod refuses a /run result over 10 MB, and a streaming job's result is all
    # its chunks (the final one, the whole answer with its logprobs, comes on top).
    stream_max_job_bytes: Annotated[int, Field(ge=10_000, le=RUNPOD_MAX_RESULT_BYTES)] = 4_000_000
    log_level: LogLevel = "INFO"
    # A Jinja chat template (the text itself) for chat input, over the tokenizer's (chat.py).
    custom_chat_template: str | None = None
    # The model name of the OpenAI routes (openai_routes.py); default: MODEL_NAME's public name.
    served_model_name: str | None = None
    # The OpenAI routes' tool calling and reasoning output: vLLM's parsers, by the names it
    # registers (checked at start-up, engine_args.check_parsers).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # How far structured output pins tool calls (vLLM's --tool-strict-level): auto, the
    # arguments of `strict: true` functions; function, every call's envelope; parameter,
    # every call's arguments too, as if each function were strict.
    tool_strict_level: Literal["auto", "function", "parameter"] = "auto"
    reasoning_parser: str | None = None
    # The engine's structured output backend (vLLM's --structured-outputs-config backend),
    # checked against vLLM's list at start-up: auto, xgrammar, guidance, outlines, ...
    structured_outputs_backend: str = "auto"

    # --- load-balancing endpoints (http_server.py) ----------------------------------
    # Which kind of RunPod endpoint the worker serves: "queue" (/run, /stream: the runpod
    # SDK's job loop) or "load_balancer" (an HTTP server RunPod sends requests to).
    # RunPod sets no variable that tells the two apart, so the endpoint's settings say it.
    endpoint_type: Literal["queue", "load_balancer"] = "queue"
    # RunPod's own variables for load-balancing workers: the port requests come to, the
    # port and path of its health check (default: the same port, /ping).
    port: Annotated[int, Field(ge=1, le=65535)] = 80
    port_health: Annotated[int, Field(ge=1, le=65535)] | None = None
    health_check_path: str = Field("/ping", pattern=r"^/[A-Za-z0-9._~/-]*$")
    # The address the server binds: all interfaces, as RunPod's proxy needs; 127.0.0.1
    # for a local run.
    host: str = Field("0.0.0.0", min_length=1)
    # A request body over this many bytes gets a 413 before it is read (RunPod's own cap
    # on a load-balancing request is 30 MB).
    max_request_bytes: Annotated[int, Field(ge=1_000, le=100_000_000)] = 30_000_000

    # --- LoRA adapters (name -> a Hugging Face repo id or a local folder) ------------
    lora_modules: dict[str, str] | None = None
    max_loras: PositiveInt = 1  # adapters in one batch (vLLM's max_loras)
    max_lora_rank: PositiveInt = 16  # the largest rank of an adapter (vLLM's max_lora_rank)

    # --- where the model comes from (model_source.py) ------------------------------
    # Hugging Face's own variables, read here so that the worker knows what the
    # libraries will do: the cache a baked image holds its model in, and offline mode.
    hf_hub_cache: str | None = None
    hf_home: str | None = None
    hf_hub_offline: bool | None = None
    transformers_offline: bool | None = None  # huggingface_hub's fallback for the above
    # The baked model's manifest (builder/download_model.py); default
    # $HF_HUB_CACHE/manifest.json.
    model_manifest: str | None = None
    # Where RunPod mounts a network volume.
    runpod_volume_path: str = Field("/runpod-volume", min_length=1)

    # --- read from RunPod's own variables, to pick the run mode --------------------
    runpod_webhook_get_job: str | None = None
    runpod_realtime_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    # The SDK's own default is DEBUG, which logs every prompt and completion; unset,
    # it follows LOG_LEVEL instead.
    runpod_log_level: Literal["NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR"] | None = None

    @field_validator("log_level", "runpod_log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("hf_hub_offline", "transformers_offline", mode="before")
    @classmethod
    def _hf_boolean(cls, value: object) -> object:
        # huggingface_hub's own reading: 1/ON/YES/TRUE are true, anything else false.
        # Values it would silently take as false (a typo such as "ture") are refused.
        if isinstance(value, str):
            if value.upper() in _HF_TRUE:
                return True
            if value.upper() in _HF_FALSE:
                return False
            raise ValueError("1, 0, true, false, yes, no, on or off")
        return value

    @field_validator("custom_chat_template")
    @classmethod
    def _jinja_text(cls, value: str | None) -> str | None:
        # vLLM's --chat-template also takes a file name; here a file name would be
        # rendered as the prompt of every chat job, so it is refused.
        if value is not None and "{{" not in value and "{%" not in value:
            raise ValueError("the text of a Jinja template (with {{ }} or {% %}), not a file name")
        return value

    @field_validator("engine_args", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("a JSON object of vLLM engine arguments (not valid JSON)") from None
        if not isinstance(parsed, dict):
            raise ValueError('a JSON object of vLLM engine arguments, e.g. {"max_num_seqs": 8}')
        return parsed

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _name_source_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in value.replace(",", " ").split():
            name, _, source = item.partition("=")
            if not _LORA_NAME.fullmatch(name) or not source:
                raise ValueError(
                    "name=source pairs separated by commas (a name of letters, digits, '.', "
                    f"'_' or '-'; a source: a Hugging Face repo id or a folder), not {item!r}"
                )
            if name in pairs:
                raise ValueError(f"name=source pairs with distinct names ({name!r} twice)")
            pairs[name] = source
        return pairs or None

    @field_validator("quantization", mode="before")
    @classmethod
    def _no_quantization(cls, value: object) -> object:
        # "none" (the RunPod Hub form's choice for no quantization) means unset.
        return None if isinstance(value, str) and value.lower() == "none" else value

    @field_validator("endpoint_type", mode="before")
    @classmethod
    def _endpoint_type(cls, value: object) -> object:
        # RunPod's console names the kinds "Queue" and "Load Balancer".
        if isinstance(value, str):
            return value.strip().lower().replace(" ", "_").replace("-", "_")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build the settings from environment variables (``Settings.from_env(os.environ)``)."""
        raw = {
            name: environ[name.upper()].strip()
            for name in cls.model_fields
            if environ.get(name.upper(), "").strip()
        }
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise SettingsError(_describe(error, raw)) from None


def _describe(error: ValidationError, raw: Mapping[str, str]) -> str:
    """One line per bad variable: its name, what it holds and what is allowed."""
    problems = []
    for detail in error.errors(include_url=False):
        name = str(detail["loc"][0])
        allowed = detail["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
        problems.append(f"{name.upper()}={raw.get(name, '')!r} is invalid: must be {allowed}")
    return "; ".join(problems)
