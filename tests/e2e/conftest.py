"""What every end-to-end module shares: the log of its server process when a test fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# The fixtures of the e2e modules that run a process with a log (``log_tail()``).
PROCESS_FIXTURES = ("endpoint", "worker")


@pytest.fixture(autouse=True)
def _process_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """On a failed test, the tail of the log of the endpoint or worker it used."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        for name in PROCESS_FIXTURES:
            if name in request.fixturenames:
                print(f"{name} log (tail):\n" + request.getfixturevalue(name).log_tail())
