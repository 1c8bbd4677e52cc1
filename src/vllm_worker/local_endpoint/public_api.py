"""The client-facing side: RunPod's queue-endpoint operations, at RunPod's paths.

``https://api.runpod.ai/v2/<endpoint_id>/<operation>`` becomes
``http://127.0.0.1:<port>/v2/<endpoint_id>/<operation>``; the shapes are in the package
docstring and in ``jobs.status_body`` / ``jobs.stream_body``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from vllm_worker.local_endpoint.context import Context
from vllm_worker.local_endpoint.jobs import RetryError, status_body, stream_body
from vllm_worker.local_endpoint.openai_api import OpenAIRelay

log = logging.getLogger(__name__)

PREFIX = "/v2/{endpoint}"

# RunPod's bounds for /runsync's ?wait= (milliseconds).
MIN_WAIT_MS, MAX_WAIT_MS = 1000, 300_000
# RunPod's lower bounds for a job's policy (milliseconds).
MIN_EXECUTION_TIMEOUT_MS, MIN_TTL_MS = 5000, 10_000


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, ctx: Context) -> None:
    routes = _PublicRoutes(ctx)

    def checked(route: Route) -> Route:
        """Every operation: this endpoint's id and the API key first; a refusal, answered."""

        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                routes.check(request)
                return await route(request)
            except _RefusedError as refused:
                return refused.response

        return answer

    app.router.add_post(PREFIX + "/run", checked(routes.run))
    app.router.add_post(PREFIX + "/runsync", checked(routes.runsync))
    for method in ("GET", "POST"):
        app.router.add_route(method, PREFIX + "/status/{job}", checked(routes.status))
        app.router.add_route(method, PREFIX + "/stream/{job}", checked(routes.stream))
    app.router.add_post(PREFIX + "/cancel/{job}", checked(routes.cancel))
    app.router.add_post(PREFIX + "/retry/{job}", checked(routes.retry))
    app.router.add_post(PREFIX + "/purge-queue", checked(routes.purge_queue))
    app.router.add_get(PREFIX + "/health", checked(routes.health))
    # RunPod's OpenAI-compatible API: every method and path under /openai/v1 becomes a job.
    app.router.add_route("*", PREFIX + OpenAIRelay.PATH, checked(OpenAIRelay(ctx).handle))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _RefusedError(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


class _PublicRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def check(self, request: web.Request) -> None:
        """Raise ``_RefusedError`` unless the request is for this endpoint and authorized."""
        if request.match_info["endpoint"] != self.ctx.config.endpoint_id:
            raise _RefusedError(
                _error(404, f"endpoint {request.match_info['endpoint']!r} not found")
            )
        api_key = self.ctx.config.api_key
        if api_key is None:
            return
        sent = request.headers.get("Authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() == "bearer" and token:
            sent = token.strip()
        if not hmac.compare_digest(sent.encode(), api_key.encode()):
            raise _RefusedError(_error(401, "Unauthorized: missing or wrong Authorization header"))

    async def _submission(self, request: web.Request) -> tuple[Any, float | None, float | None]:
        """The job input and policy (execution timeout, ttl; seconds) of a /run body."""
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _RefusedError(_error(400, f"the body is not JSON: {error}")) from None
        if not isinstance(body, dict) or "input" not in body:
            raise _RefusedError(_error(400, 'the body must be a JSON object with an "input" key'))
        if body.get("webhook"):
            log.warning("webhook %r ignored: the local endpoint calls no URL", body["webhook"])
        policy = body.get("policy") or {}
        if not isinstance(policy, dict):
            raise _RefusedError(_error(400, "policy must be an object"))
        timeout_s = _policy_ms(policy, "executionTimeout", MIN_EXECUTION_TIMEOUT_MS)
        ttl_s = _policy_ms(policy, "ttl", MIN_TTL_MS)
        return body["input"], timeout_s, ttl_s

    async def run(self, request: web.Request) -> web.StreamResponse:
        job_input, timeout_s, ttl_s = await self._submission(request)
        job = self.store.submit(job_input, execution_timeout_s=timeout_s, ttl_s=ttl_s)
        log.info("job %s queued (/run)", job.id)
        return web.json_response({"id": job.id, "status": job.status.value})

    async def runsync(self, request: web.Request) -> web.StreamResponse:
        wait_ms = _wait_ms(request.query.get("wait"), self.ctx.config.runsync_wait_s)
        job_input, timeout_s, ttl_s = await self._submission(request)
        job = self.store.submit(job_input, sync=True, execution_timeout_s=timeout_s, ttl_s=ttl_s)
        log.info("job %s queued (/runsync, waits up to %d ms)", job.id, wait_ms)
        ctx = self.ctx
        await ctx.changes.wait_for(lambda: job.status.final or ctx.draining, wait_ms / 1000)
        return web.json_response(status_body(job))

    async def status(self, request: web.Request) -> web.StreamResponse:
        job = self.store.get(request.match_info["job"])
        if job is None:
            return _not_found()
        return web.json_response(status_body(job))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        read = self.store.read_stream(request.match_info["job"])
        if read is None:
            return _not_found()
        job, outputs = read
        return web.json_response(stream_body(job, outputs))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        job = self.store.cancel(request.match_info["job"])
        if job is None:
            return _not_found()
        log.info("job %s: cancel -> %s", job.id, job.status.value)
        return web.json_response({"id": job.id, "status": job.status.value})

    async def retry(self, request: web.Request) -> web.StreamResponse:
        try:
            job = self.store.retry(request.match_info["job"])
        except RetryError as error:
            return _error(400, str(error))
        if job is None:
            return _not_found()
        log.info("job %s queued again (/retry)", job.id)
        return web.json_response({"id": job.id, "status": job.status.value})

    async def purge_queue(self, request: web.Request) -> web.StreamResponse:
        removed = self.store.purge_queue()
        log.info("purge-queue: %d queued jobs cancelled", removed)
        return web.json_response({"removed": removed, "status": "completed"})

    async def health(self, request: web.Request) -> web.StreamResponse:
        body = self.store.health(workers_initializing=self.ctx.workers_initializing())
        return web.json_response(body)


def _not_found() -> web.Response:
    # Unknown ids and results past their retention alike.
    return _error(404, "request does not exist")


def _wait_ms(raw: str | None, default_s: float) -> float:
    if raw is None:
        return default_s * 1000
    try:
        wait = int(raw)
    except ValueError:
        raise _RefusedError(_error(400, f"wait={raw!r}: must be milliseconds")) from None
    return float(min(max(wait, MIN_WAIT_MS), MAX_WAIT_MS))


def _policy_ms(policy: dict[str, Any], name: str, minimum_ms: int) -> float | None:
    """A policy time in seconds, or None when not given."""
    value = policy.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum_ms:
        raise _RefusedError(_error(400, f"policy.{name}: must be a number of ms >= {minimum_ms}"))
    return float(value) / 1000
