"""A stand-in Hugging Face Hub on loopback, for the builder's tests and the image test.

It implements what ``huggingface_hub.snapshot_download`` calls: model info
(``/api/models/<repo>[/revision/<rev>]``: ``sha`` and ``siblings``), the file tree
(``/api/models/<repo>/tree/<rev>``) and ``HEAD``/``GET /<repo>/resolve/<rev>/<file>``
with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``; errors carry the Hub's
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``GatedRepo``, ``EntryNotFound``).
Point ``HF_ENDPOINT`` at ``FakeHub.url``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# The stand-in Hub shuts itself down after this long, even if a test hangs.
SERVER_LIFETIME_S = 1800


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    accepted_token: str | None = None  # set: a gated repo that only this token may read
    # A reply to model info that echoes the credential it got (a badly behaved proxy).
    echo_auth_with_status: int | None = None

    def __post_init__(self) -> None:
        if "main" not in self.refs:
            digest = hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()
            self.refs["main"] = digest

    def commit(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.refs.values() else None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    def __init__(self, repos: Mapping[str, FakeRepo]) -> None:
        self.repos = dict(repos)
        self.requests: list[Request] = []
        self.url = ""

    def resolved_files(self, repo_id: str) -> set[str]:
        """The files of ``repo_id`` whose bytes were served (GET)."""
        prefix = f"/{repo_id}/resolve/"
        return {
            unquote(r.path.split("?")[0])[len(prefix) :].split("/", 1)[1]
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix)
        }


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<dir>.+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _etag(name: str, content: bytes) -> str:
    """As the Hub: sha256 for LFS files (weights), the git blob sha1 for the others."""
    if name.endswith((".safetensors", ".bin", ".pth", ".pt", ".model", ".pdf")):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test output is the builder's

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, *, body: bool) -> None:
            auth = self.headers.get("Authorization")
            hub.requests.append(Request(self.command, self.path, auth))
            path = urlsplit(self.path).path
            for pattern, route in ((_TREE, self._tree), (_INFO, self._info)):
                match = pattern.match(path)
                if match and self.command == "GET":
                    route(match, auth)
                    return
            match = _RESOLVE.match(path)
            if match:
                self._resolve(match, auth, body=body)
                return
            self._error(404, None, "Not Found", body=body)

        def _repo(self, match: re.Match[str], body: bool = True) -> tuple[FakeRepo, str] | None:
            repo_id = unquote(match["repo"])
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", body=body)
                return None
            revision = unquote(match["rev"] or "main")
            commit = repo.commit(revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body)
                return None
            return repo, commit

        def _info(self, match: re.Match[str], auth: str | None) -> None:
            found = self._repo(match)
            if found is None:
                return
            repo, commit = found
            blobs = "blobs=true" in (urlsplit(self.path).query or "").lower()
            if repo.echo_auth_with_status is not None:
                self._error(
                    repo.echo_auth_with_status,
                    None,
                    f"credential {auth} refused for {match['repo']}",
                    body=True,
                )
                return
            self._json(
                {
                    "_id": "0" * 24,
                    "id": unquote(match["repo"]),
                    "modelId": unquote(match["repo"]),
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo.accepted_token else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [
                        {"rfilename": name, **({"size": len(content)} if blobs else {})}
                        for name, content in sorted(repo.files.items())
                    ],
                }
            )

        def _tree(self, match: re.Match[str], auth: str | None) -> None:
            found = self._repo(match)
            if found is None:
                return
            repo, _ = found
            entries: list[dict[str, Any]] = []
            folders = sorted({name.rsplit("/", 1)[0] for name in repo.files if "/" in name})
            entries += [{"type": "directory", "oid": "1" * 40, "path": f} for f in folders]
            for name, content in sorted(repo.files.items()):
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": hashlib.sha1(content).hexdigest(),
                    "size": len(content),
                    "path": name,
                }
                etag = _etag(name, content)
                if len(etag) == 64:
                    entry["lfs"] = {"oid": etag, "size": len(content), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, match: re.Match[str], auth: str | None, *, body: bool) -> None:
            found = self._repo(match, body)
            if found is None:
                return
            repo, commit = found
            if repo.accepted_token is not None and auth != f"Bearer {repo.accepted_token}":
                status = 401 if auth is None else 403
                message = f"Access to model {match['repo']} is restricted."
                self._error(status, "GatedRepo", message, body=body, commit=commit)
                return
            name = unquote(match["file"])
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} not found", body=body, commit=commit)
                return
            content = repo.files[name]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.send_header("ETag", f'"{_etag(name, content)}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                self.wfile.write(content)

        def _json(self, data: Any) -> None:
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _error(
            self,
            status: int,
            code: str | None,
            message: str,
            *,
            body: bool,
            commit: str | None = None,
        ) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


@contextmanager
def serve_hub(repos: Mapping[str, FakeRepo]) -> Iterator[FakeHub]:
    """A stand-in Hub on 127.0.0.1 for the duration of the block (at most SERVER_LIFETIME_S)."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield hub
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def repo_of_folder(folder: Path, accepted_token: str | None = None) -> FakeRepo:
    """A repo holding every file of ``folder`` (a model saved with save_pretrained)."""
    files = {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    return FakeRepo(files, accepted_token=accepted_token)
