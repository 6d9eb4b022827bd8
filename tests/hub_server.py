"""A tiny Hugging Face Hub on 127.0.0.1 for tests: the few endpoints huggingface_hub uses.

``HfApi.create_repo`` / ``upload_folder`` (every file uploaded in "regular" mode, content
inline in the commit; deletions applied) and ``snapshot_download`` (repo info, tree, file
resolve) talk to it for real over HTTP, so uploads and the Hub cache are exercised by the
Hub library itself.
Files live in memory: ``server.repos[repo_id][path] = bytes``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LocalHub:
    """Start with ``with LocalHub() as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo: str, files: dict[str, bytes], deleted: tuple[str, ...] = ()) -> str:
        self.repos.setdefault(repo, {}).update(files)
        for path in deleted:
            self.repos[repo].pop(path, None)
        digest = hashlib.sha1(json.dumps(sorted(self.repos[repo])).encode())
        for name in sorted(self.repos[repo]):
            digest.update(self.repos[repo][name])
        self.commits[repo] = digest.hexdigest()
        return self.commits[repo]


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    repo = r"(?P<repo>[^/]+/[^/]+)"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value: Any, status: int = 200) -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_POST(self) -> None:
            hub.requests.append(f"POST {self.path}")
            body = self._body()
            if self.path == "/api/repos/create":
                name = json.loads(body)
                full = f"{name.get('organization') or 'user'}/{name['name']}"
                hub.repos.setdefault(full, {})
                return self._json({"url": f"{hub.url}/{full}"})
            if self.path == "/api/validate-yaml":
                return self._json({})
            if match := re.fullmatch(rf"/api/models/{repo}/preupload/[^/?]+", self.path):
                files = json.loads(body)["files"]
                modes = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]
                return self._json({"files": modes})
            if match := re.fullmatch(rf"/api/models/{repo}/commit/[^/?]+", self.path):
                files, deleted = {}, []
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    if item["key"] == "deletedFile":
                        deleted.append(item["value"]["path"])
                sha = hub.commit(match["repo"], files, tuple(deleted))
                url = f"{hub.url}/{match['repo']}/commit/{sha}"
                return self._json({"commitUrl": url, "commitOid": sha})
            return self._json({"error": "not found"}, 404)

        def do_GET(self) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            path = self.path.split("?")[0]
            if match := re.fullmatch(rf"/api/models/{repo}(/revision/[^/]+)?", path):
                if match["repo"] not in hub.commits:
                    return self._json({"error": "Repository not found"}, 404)
                files = hub.repos[match["repo"]]
                return self._json(
                    {
                        "id": match["repo"],
                        "sha": hub.commits[match["repo"]],
                        "siblings": [{"rfilename": name} for name in sorted(files)],
                    }
                )
            if match := re.fullmatch(rf"/api/models/{repo}/tree/[^/]+/?", path):
                files = hub.repos.get(match["repo"], {})
                return self._json(
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                        for name, data in sorted(files.items())
                    ]
                )
            if match := re.fullmatch(rf"/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
                data = hub.repos.get(match["repo"], {}).get(match["file"])
                if data is None:
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                headers = {"X-Repo-Commit": hub.commits[match["repo"]], "ETag": f'"{_oid(data)}"'}
                return self._send(200, data, headers)
            return self._json({"error": "not found"}, 404)

        do_HEAD = do_GET

    return Handler


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
