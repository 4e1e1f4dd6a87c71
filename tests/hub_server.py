"""A Hugging Face Hub stand-in on 127.0.0.1: the part of the Hub HTTP API that huggingface_hub's uploads and downloads
use (repo creation, repo info, preupload, commit, file resolution, tree listing), for model and dataset repos (in one
namespace), in memory. It does
not validate model-card metadata (it accepts every card)."""

import base64
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


logger = logging.getLogger(__name__)


@dataclass
class Repository:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    private: bool = False

    def snapshot(self, revision: str = "main") -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) at `revision`: "main" or a commit sha (or a prefix of one)."""
        if not self.commits:
            return None
        if revision == "main":
            return self.commits[-1]
        return next(((sha, files) for sha, files in self.commits if sha.startswith(revision)), None)


class LocalHubServer:
    """Serves model repositories kept in memory. `start()` binds a free port; `stop()` closes the socket, after which
    clients get connection errors, as when the Hub is unreachable; `pause()` keeps accepting connections but answers
    nothing until `unpause()`, as a Hub that hangs. With `token`, writes need `Authorization: Bearer <token>` (else 401)."""

    def __init__(self, token: str | None = None):
        self.repositories: dict[str, Repository] = {}
        self.unknown_requests: list[str] = []
        self.token = token
        self.answering = threading.Event()
        self.answering.set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def pause(self) -> None:
        self.answering.clear()

    def unpause(self) -> None:
        self.answering.set()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHubServer":
        hub = self

        class Handler(HubRequestHandler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.answering.set()  # requests held by `pause` end, so that the server can shut down
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repository at a revision (empty if the repository or revision does not exist)."""
        repository = self.repositories.get(repo_id)
        snapshot = repository.snapshot(revision) if repository else None
        return dict(snapshot[1]) if snapshot else {}

    def commit(self, repo_id: str, additions: dict[str, bytes], deletions: list[str]) -> str:
        with self._lock:
            repository = self.repositories[repo_id]
            files = dict(repository.commits[-1][1]) if repository.commits else {}
            files.update(additions)
            for path in deletions:
                files.pop(path, None)
            sha = hashlib.sha1(f"{repo_id}:{len(repository.commits)}:{sorted(files)}".encode()).hexdigest()
            repository.commits.append((sha, files))
            return sha


class HubRequestHandler(BaseHTTPRequestHandler):
    server_hub: LocalHubServer
    # One request per connection, so that after `stop()` no kept-alive connection is still served.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:
        logger.debug(format, *args)

    # Routing -----------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = urlparse(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server_hub.answering.wait()
        token = self.server_hub.token
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            return self.send_json(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if path == "/api/validate-yaml":  # model-card metadata check before an upload; this stand-in accepts all
            return self.send_json(200, {})
        if match := re.fullmatch(r"/api/(?:models|datasets)/(.+)/preupload/([^/]+)", path):
            return self.preupload(match[1], json.loads(body))
        if match := re.fullmatch(r"/api/(?:models|datasets)/(.+)/commit/([^/]+)", path):
            return self.create_commit(match[1], body)
        self.unknown(body)

    def do_GET(self) -> None:
        self.route_read(send_body=True)

    def do_HEAD(self) -> None:
        self.route_read(send_body=False)

    def route_read(self, send_body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.server_hub.answering.wait()
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: an empty one
            return self.send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if match := re.fullmatch(r"/api/(?:models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self.repo_info(match[1], match[2] or "main")
        if match := re.fullmatch(r"/api/(?:models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            return self.tree(match[1], match[2], match[3] or "")
        if match := re.fullmatch(r"(?:/datasets)?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self.resolve(match[1], match[2], match[3], send_body)
        self.unknown(b"")

    # Endpoints ---------------------------------------------------------------------------------------------------
    def create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        url = f"{self.server_hub.endpoint}/{repo_id}"
        if repo_id in self.server_hub.repositories:
            return self.send_json(409, {"error": "You already created this model repo", "url": url})
        # huggingface_hub >= 1.0 sends `visibility`; older clients sent `private`
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.server_hub.repositories[repo_id] = Repository(private=private)
        self.server_hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, [])
        self.send_json(200, {"url": url, "name": repo_id})

    def repo_info(self, repo_id: str, revision: str) -> None:
        snapshot = self.snapshot_or_404(repo_id, revision)
        if snapshot:
            sha, files = snapshot
            siblings = [{"rfilename": path} for path in sorted(files)]
            self.send_json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": self.server_hub.repositories[repo_id].private, "siblings": siblings})

    def tree(self, repo_id: str, revision: str, folder: str) -> None:
        snapshot = self.snapshot_or_404(repo_id, revision)
        if snapshot:
            entries = [
                {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                for path, content in sorted(snapshot[1].items())
                if path.startswith(folder)
            ]
            self.send_json(200, entries)

    def preupload(self, repo_id: str, payload: dict) -> None:
        if repo_id not in self.server_hub.repositories:
            return self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        files = [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for item in payload["files"]]
        self.send_json(200, {"files": files})

    def create_commit(self, repo_id: str, body: bytes) -> None:
        if repo_id not in self.server_hub.repositories:
            return self.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        additions, deletions = {}, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "file":
                additions[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deletions.append(item["value"]["path"])
            elif item["key"] != "header":
                return self.send_json(400, {"error": f"unsupported commit operation {item['key']!r}"})
        sha = self.server_hub.commit(repo_id, additions, deletions)
        url = f"{self.server_hub.endpoint}/{repo_id}/commit/{sha}"
        self.send_json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})

    def resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
        snapshot = self.snapshot_or_404(repo_id, revision)
        if not snapshot:
            return
        sha, files = snapshot
        if path not in files:
            return self.send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        content = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"', "Content-Type": "application/octet-stream"}
        self.send_bytes(200, content, headers, send_body)

    # Helpers -----------------------------------------------------------------------------------------------------
    def snapshot_or_404(self, repo_id: str, revision: str):
        repository = self.server_hub.repositories.get(repo_id)
        snapshot = repository.snapshot(revision) if repository else None
        if snapshot is None:
            code = "RepoNotFound" if repository is None else "RevisionNotFound"
            self.send_json(404, {"error": f"{code}: {repo_id}@{revision}"}, {"X-Error-Code": code})
        return snapshot

    def unknown(self, body: bytes) -> None:
        request = f"{self.command} {self.path}"
        self.server_hub.unknown_requests.append(request)
        logger.warning("local hub: no route for %s", request)
        self.send_json(404, {"error": f"the local Hub server does not implement {request}"})

    def send_json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, True)

    def send_bytes(self, status: int, content: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if send_body and self.command != "HEAD":
            self.wfile.write(content)
