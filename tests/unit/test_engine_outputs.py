"""How engine.py reads what vLLM returns: a request vLLM ended with an error, and which
input field a validation error of vLLM's is about (pure functions, vLLM's own types)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from vllm.exceptions import VLLMValidationError

from vllm_worker.engine import _check_not_failed, _field_of
from vllm_worker.engine_types import GenerationRequest
from vllm_worker.errors import EngineError
from vllm_worker.schema import parse_job_input


def request(**sampling: Any) -> GenerationRequest:
    job = parse_job_input({"prompt": "x", "sampling_params": sampling}, max_n=4)
    return GenerationRequest("r-1", [1, 2], job.sampling_params, max_tokens=8, stream=True)


def output(*reasons: str | None, finished: bool = True) -> Any:
    return SimpleNamespace(
        finished=finished, outputs=[SimpleNamespace(finish_reason=r) for r in reasons]
    )


def test_a_request_vllm_ended_with_an_error_fails_the_job() -> None:
    wanted = request(structured_outputs={"regex": "[a-z]+"})
    with pytest.raises(EngineError, match=r"^the engine could not serve its structured output"):
        _check_not_failed(output("stop", "error"), wanted)
    with pytest.raises(EngineError, match=r"^the engine could not serve the request"):
        _check_not_failed(output("error"), request())
    _check_not_failed(output("stop", "length"), wanted)  # ended well
    _check_not_failed(output(None, finished=False), wanted)


def test_vllms_validation_errors_name_the_field() -> None:
    named = VLLMValidationError("out of vocabulary", parameter="logit_bias")
    assert _field_of(named, request().sampling) == "sampling_params.logit_bias"
    unnamed = VLLMValidationError("Failed to transform regex into a grammar")
    structured = request(structured_outputs={"choice": ["a", "b"]}).sampling
    assert _field_of(unnamed, structured) == "sampling_params.structured_outputs.choice"
    assert _field_of(unnamed, request().sampling) == "input"
