"""The worker-facing side: the job API a RunPod worker's SDK polls and posts to.

It speaks what the runpod SDK (1.12) speaks in its production loop
(``runpod/serverless/modules/rp_job.py``, ``rp_scale.py``, ``rp_http.py``, ``rp_ping.py``):

- ``GET  /v2/<endpoint>/job-take/<worker>?...&job_in_progress=0|1``: long poll; one job
  ``{"id": ..., "input": ...}`` or 204;
- ``GET  /v2/<endpoint>/job-take-batch/<worker>?...&batch_size=N&job_in_progress=0|1``:
  long poll; a JSON list of at most N jobs or 204 (used when the worker's
  ``concurrency_modifier`` leaves room for more than one job);
- ``GET  /v2/<endpoint>/job-stop/<worker>?...``: long poll; ``{"jobsToStop": [...]}`` or
  204. The SDK cancels those jobs' tasks (the handler sees ``CancelledError``);
- ``POST /v2/<endpoint>/job-stream/<worker>/<job>?...&isStream=...``: ``{"output": chunk}``;
- ``POST /v2/<endpoint>/job-done/<worker>/<job>?...&isStream=...``: the job's result,
  ``{"output": ...}`` or ``{"error": "..."}``;
- ``GET  /v2/<endpoint>/ping/<worker>?...&job_id=a,b&runpod_version=...``: heartbeat.

SDK quirks handled here: POST bodies are JSON sent as
``application/x-www-form-urlencoded`` (the raw body is parsed as JSON); the SDK re-polls
job-take at once after a 204, so empty polls are held open (``take_hold_s``); after an
empty job-stop answer it pauses a second, so that poll is held too (``stop_hold_s``),
though not much longer: after SIGTERM the SDK exits only once its held polls ended;
``X-Request-ID`` is set on a session shared by all jobs, so the job id is taken from
the URL. Every URL carries the endpoint's worker token in its query string, because the
SDK sends ``~/.runpod/config.toml``'s API key, when there is one, instead of
``RUNPOD_AI_API_KEY``. A worker's breach of the protocol is answered with 4xx, logged,
and recorded in ``store.problems``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from vllm_worker.local_endpoint.context import Context
from vllm_worker.local_endpoint.jobs import Job, PostResult

log = logging.getLogger(__name__)

PREFIX = "/v2/{endpoint}"


def worker_env(ctx: Context, base_url: str, worker_id: str) -> dict[str, str]:
    """The RUNPOD_* variables that attach a worker's SDK to this endpoint.

    ``$ID`` in the take URL becomes the worker id; in the post URLs ``$RUNPOD_POD_ID``
    becomes the worker id and ``$ID`` the job id. Every URL has a query string because
    the SDK appends ``&name=value`` to it.
    """
    base = f"{base_url}/v2/{ctx.config.endpoint_id}"
    query = f"?token={ctx.config.worker_token}"
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID{query}",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID{query}",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID{query}",
        "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID{query}",
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_AI_API_KEY": ctx.config.worker_token,
        # Loopback only: the SDK's start-up checks connect to 8.8.8.8 and probe GPUs.
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
    }


def add_routes(app: web.Application, ctx: Context) -> None:
    routes = _WorkerRoutes(ctx)
    app.router.add_get(PREFIX + "/job-take/{worker}", routes.take)
    app.router.add_get(PREFIX + "/job-take-batch/{worker}", routes.take_batch)
    app.router.add_get(PREFIX + "/job-stop/{worker}", routes.job_stop)
    app.router.add_post(PREFIX + "/job-stream/{worker}/{job}", routes.job_stream)
    app.router.add_post(PREFIX + "/job-done/{worker}/{job}", routes.job_done)
    app.router.add_get(PREFIX + "/ping/{worker}", routes.ping)


def _job_json(job: Job) -> dict[str, Any]:
    return {"id": job.id, "input": job.input}


class _WorkerRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def _refuse(self, request: web.Request) -> web.Response | None:
        """A response refusing the call, or None when it comes from an attached worker."""
        if request.match_info["endpoint"] != self.ctx.config.endpoint_id:
            return self._problem(404, f"wrong endpoint id in {request.path}")
        if request.query.get("token") != self.ctx.config.worker_token:
            return self._problem(401, f"missing or wrong worker token on {request.path}")
        return None

    def _problem(self, status: int, message: str) -> web.Response:
        log.warning("worker protocol: %s", message)
        self.store.problem(message)
        return web.json_response({"error": message}, status=status)

    async def take(self, request: web.Request) -> web.StreamResponse:
        return await self._take(request, batch=False)

    async def take_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._take(request, batch=True)

    async def _take(self, request: web.Request, *, batch: bool) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        worker_id = request.match_info["worker"]
        job_in_progress = request.query.get("job_in_progress")
        if job_in_progress not in {"0", "1"}:
            self._problem(400, f"job_in_progress={job_in_progress!r} on {request.path_qs}")
        batch_size = 1
        if batch:
            try:
                batch_size = int(request.query["batch_size"])
            except (KeyError, ValueError):
                return self._problem(400, f"job-take-batch without batch_size: {request.path_qs}")
        ctx = self.ctx
        self.store.poll_started(worker_id, take=True)
        try:
            await ctx.changes.wait_for(
                lambda: ctx.draining or self.store.has_queued(), ctx.config.take_hold_s
            )
        finally:
            self.store.poll_ended(worker_id, take=True)
        if ctx.draining:
            return web.Response(status=204)
        jobs = self.store.take(worker_id, batch_size, batch=batch, job_in_progress=job_in_progress)
        if not jobs:
            return web.Response(status=204)
        log.debug("worker %s took %s", worker_id, ", ".join(job.id for job in jobs))
        if batch:
            return web.json_response([_job_json(job) for job in jobs])
        return web.json_response(_job_json(jobs[0]))

    async def job_stop(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        worker_id = request.match_info["worker"]
        ctx = self.ctx
        self.store.poll_started(worker_id)
        try:
            await ctx.changes.wait_for(
                lambda: ctx.draining or self.store.has_stops(worker_id), ctx.config.stop_hold_s
            )
        finally:
            self.store.poll_ended(worker_id)
        to_stop = self.store.pop_stops(worker_id)
        if not to_stop:
            return web.Response(status=204)
        log.info("telling worker %s to stop %s", worker_id, ", ".join(to_stop))
        return web.json_response({"jobsToStop": to_stop})

    async def _read_body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._problem(400, f"{request.path}: body is not JSON ({error}): {raw[:200]!r}")
            raise _BadBodyError from None

    async def job_stream(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        worker_id, job_id = request.match_info["worker"], request.match_info["job"]
        try:
            body = await self._read_body(request)
        except _BadBodyError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(body, dict) or set(body) != {"output"}:
            return self._problem(400, f"job {job_id}: job-stream body is not {{'output': ...}}")
        result = self.store.post_stream(worker_id, job_id, body["output"])
        return self._answer_post(result, request)

    async def job_done(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        worker_id, job_id = request.match_info["worker"], request.match_info["job"]
        try:
            body = await self._read_body(request)
        except _BadBodyError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        result = self.store.finish(worker_id, job_id, body, is_stream=request.query.get("isStream"))
        if result is PostResult.ACCEPTED:
            job = self.store.get(job_id)
            assert job is not None
            log.info(
                "job %s %s after %d ms (%d ms in the queue)",
                job_id,
                job.status.value,
                job.execution_ms or 0,
                job.delay_ms or 0,
            )
        return self._answer_post(result, request)

    def _answer_post(self, result: PostResult, request: web.Request) -> web.Response:
        if result is PostResult.UNKNOWN_JOB:
            return self._problem(404, f"{request.path}: a job this worker was never given")
        if result is PostResult.IGNORED:
            # 200 all the same: the SDK retries failed posts, and the job is over.
            job = self.store.get(request.match_info["job"])
            assert job is not None
            log.log(
                logging.INFO if job.ignored_posts == 1 else logging.DEBUG,
                "job %s is %s: ignored post %d from the worker (%s)",
                job.id,
                job.status.value,
                job.ignored_posts,
                request.path.split("/")[3],
            )
        return web.json_response({})

    async def ping(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        params = {name: value for name, value in request.query.items() if name != "token"}
        self.store.ping(request.match_info["worker"], params)
        return web.json_response({})


class _BadBodyError(Exception):
    pass
