"""The admission policy: engine load in, how many jobs the worker may hold out."""

import pytest

from vllm_worker.admission import KV_CACHE_FULL, allowed_concurrency
from vllm_worker.engine_types import EngineLoad

MAX = 64


def load(running: int = 4, waiting: int = 0, kv: float = 0.2) -> EngineLoad:
    return EngineLoad(running=running, waiting=waiting, kv_cache_usage=kv, max_running=256)


def test_an_engine_with_room_takes_up_to_max_concurrency() -> None:
    assert allowed_concurrency(load(), held=4, max_concurrency=MAX) == MAX
    assert allowed_concurrency(load(kv=KV_CACHE_FULL - 0.01), held=30, max_concurrency=MAX) == MAX


def test_no_stats_yet_or_no_job_held_means_room() -> None:
    assert allowed_concurrency(None, held=3, max_concurrency=MAX) == MAX
    # Stats only come with engine outputs: an idle engine's last ones may say "full".
    assert allowed_concurrency(load(waiting=5, kv=1.0), held=0, max_concurrency=MAX) == MAX


@pytest.mark.parametrize(
    "engine_load",
    [
        load(waiting=1),
        load(waiting=12, kv=0.5),
        load(kv=KV_CACHE_FULL),
        load(kv=1.0),
        load(running=256),  # MAX_NUM_SEQS: the next request would wait
    ],
)
def test_a_full_engine_takes_no_new_job_and_keeps_those_held(engine_load: EngineLoad) -> None:
    # Exactly what it holds: no job is taken, and every job already taken keeps its slot.
    assert allowed_concurrency(engine_load, held=10, max_concurrency=MAX) == 10
    assert allowed_concurrency(engine_load, held=1, max_concurrency=MAX) == 1


def test_never_above_max_concurrency() -> None:
    assert allowed_concurrency(load(waiting=3), held=80, max_concurrency=MAX) == MAX
    assert allowed_concurrency(load(), held=80, max_concurrency=MAX) == MAX
