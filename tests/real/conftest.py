"""The real model's tests run endpoints as the e2e tests do: the same log on failure."""

from e2e.conftest import _process_log_on_failure  # noqa: F401  (an autouse fixture)
