"""Admission: how many jobs the worker may hold, from the engine's load (a pure policy).

RunPod hands a worker as many jobs as its ``concurrency_modifier`` allows. A worker that
takes ``MAX_CONCURRENCY`` jobs while its engine is full only queues them inside vLLM,
where they wait although another worker could start them now. So the worker takes new
jobs only while the engine has room: no request waits in vLLM's scheduler queue, fewer
than ``MAX_NUM_SEQS`` run, and the KV cache is not nearly full.
"""

from __future__ import annotations

from vllm_worker.engine_types import EngineLoad

# KV-cache use (0-1) from which the engine counts as full: running requests grow their
# cache as they generate, and past this point vLLM soon preempts or queues new ones.
KV_CACHE_FULL = 0.9


def engine_is_full(load: EngineLoad) -> bool:
    """Whether the engine has no room for another request: some wait in its queue, it
    runs as many as it may, or its KV cache is nearly full."""
    return (
        load.waiting > 0 or load.running >= load.max_running or load.kv_cache_usage >= KV_CACHE_FULL
    )


def allowed_concurrency(load: EngineLoad | None, held: int, max_concurrency: int) -> int:
    """How many jobs the worker may hold now, ``held`` being those it holds (running or
    taken and about to start).

    With room in the engine: ``max_concurrency``. When it is full: ``held``, so that no
    new job comes and none already taken is left without a slot (never below 1: a worker
    that holds no job has an idle engine, whatever its last stats said).
    """
    if load is None or held == 0 or not engine_is_full(load):
        return max_concurrency
    return max(1, min(held, max_concurrency))
