"""A local RunPod serverless endpoint that runs this worker in true production mode.

``python -m vllm_worker.local_endpoint`` serves, on 127.0.0.1:8000, RunPod's public
queue-endpoint API for one endpoint (id ``local``) at RunPod's own paths, so a RunPod
client works against it by changing only the base URL::

    https://api.runpod.ai/v2/<endpoint_id>/run  ->  http://127.0.0.1:8000/v2/local/run

Behind it, it starts ``python -u src/handler.py`` with ``RUNPOD_WEBHOOK_*`` pointing at
its own worker-facing side (``worker_api``), so what runs is the runpod SDK's real
production loop: job-take / job-take-batch long polls, ``concurrency_modifier``, per-job
stop (job-stop), streaming (job-stream), results and errors (job-done), heartbeats.
``--no-worker`` serves only, for a worker started separately (``docker run``).

Shapes, matched to RunPod's operation reference (``docs.runpod.io/serverless/endpoints/
operation-reference`` and ``.../send-requests``, read in the ``runpod/docs`` repository,
``serverless/endpoints/operation-reference.mdx``; job states from ``job-states.mdx``):

- ``POST /run`` ``{"input": ..., "policy"?: {"executionTimeout": ms, "ttl": ms}}`` ->
  ``{"id": "<uuid>", "status": "IN_QUEUE"}``.
- ``POST /runsync?wait=<ms>`` (1000-300000, default 90000) -> the job's status object
  once it ended, else the same object still ``IN_QUEUE`` / ``IN_PROGRESS`` (poll
  ``/status``). Ids of /runsync jobs start with ``sync-`` as RunPod's do.
- ``GET|POST /status/<id>`` -> ``{"id", "status", "delayTime"?, "executionTime"?,
  "output"?, "error"?}``: ``delayTime`` (ms queued) once a worker took the job,
  ``executionTime`` (ms on the worker) once it ended, ``output`` as the worker returned
  it (for this worker: the list of all chunks), ``error`` when FAILED or TIMED_OUT.
- ``GET|POST /stream/<id>`` -> ``{"id", "status", "stream": [{"output": chunk}, ...]}``:
  the chunks streamed since the previous ``/stream`` call (the seed endpoint's example
  shows ``{"status", "stream"}``); ``error`` is added when the job failed.
- ``POST /cancel/<id>`` -> ``{"id", "status": "CANCELLED"}`` (a job that ended already
  keeps, and reports, its status). A queued job leaves the queue; a running one is
  stopped through the worker's job-stop channel (the SDK cancels the handler's task, and
  the handler's vLLM request is aborted); its later posts are ignored.
- ``POST /retry/<id>`` (FAILED or TIMED_OUT only) -> ``{"id", "status": "IN_QUEUE"}``.
- ``POST /purge-queue`` -> ``{"removed": n, "status": "completed"}``.
- ``GET /health`` -> ``{"jobs": {"completed", "failed", "inProgress", "inQueue",
  "retried"}, "workers": {"idle", "initializing", "running"}}``.
- ``/openai/v1/<path>`` (any method): RunPod's OpenAI-compatible API; each request is a
  job ``{"openai_route": "/v1/<path>", "openai_input": <body>}`` and its output is the
  answer (``openai_api``).
- Job states: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT. A job
  running longer than the execution timeout (RunPod's default 600 s; ``policy.
  executionTimeout`` per job) ends TIMED_OUT and the worker is told to stop it.
  Results stay readable for 30 min (``/run``) or 1 min (``/runsync``), as on RunPod; then
  ``/status`` answers 404 ``{"error": "request does not exist"}``.
- ``Authorization``: checked only when an API key is configured (``--api-key``); the key
  alone or ``Bearer <key>`` (the runpod SDK's form) is accepted; else 401.

Where it differs from RunPod (as far as the documentation shows): ``/health``'s
``failed`` counts FAILED and TIMED_OUT jobs since start, and ``workers`` adds
``initializing`` (the worker process is loading its model); ``/purge-queue`` marks the
purged jobs CANCELLED rather than making them unknown; ``policy.ttl`` bounds only the
wait in the queue; ``webhook`` and ``s3Config`` are ignored (nothing is called but
loopback); ``/status?ttl=``, rate limits and the 429 queue limit are not implemented.
"""

from vllm_worker.local_endpoint.context import EndpointConfig
from vllm_worker.local_endpoint.jobs import JobStatus, JobStore, StoreLimits
from vllm_worker.local_endpoint.server import LocalEndpoint, ThreadedEndpoint, serve

__all__ = [
    "EndpointConfig",
    "JobStatus",
    "JobStore",
    "LocalEndpoint",
    "StoreLimits",
    "ThreadedEndpoint",
    "serve",
]
