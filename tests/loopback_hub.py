"""A Hugging Face Hub on 127.0.0.1 for tests: stdlib HTTP in front of real bare git repositories.

The real `huggingface_hub` client talks to it unchanged: create_repo, create_branch, create_tag, upload_folder /
create_commit (adds, deletes, copies), list_repo_refs, list_repo_commits, list_repo_files / tree, repo_info,
paths-info, hf_hub_download, snapshot_download and HfFileSystem (range reads). Every file is a plain git blob:
preupload answers "regular", so no LFS or Xet transfer ever happens (set HF_HUB_DISABLE_XET=1 anyway). Error answers
carry the Hub's X-Error-Code, so the client raises RepositoryNotFoundError, RevisionNotFoundError and
EntryNotFoundError as it does against the real Hub.
HF_HUB_OFFLINE=1 blocks loopback too: processes that talk to this server must run without it.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GIT_ENV = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@localhost", "GIT_COMMITTER_NAME": "hub",
           "GIT_COMMITTER_EMAIL": "hub@localhost", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


# The Hub's X-Error-Code of an error answer, by the start of its message: huggingface_hub raises the real Hub's
# exception types from it (RepositoryNotFoundError...), and tells a missing file from a broken connection on HEAD.
ERROR_CODES = {"Entry Not Found": "EntryNotFound", "Revision Not Found": "RevisionNotFound",
               "Repository Not Found": "RepoNotFound"}


def let_online(monkeypatch, home: Path, token: str) -> None:
    """Let this process's Hub clients (huggingface_hub, datasets) reach the loopback server: offline mode unset (it
    blocks loopback too), no Xet, the token in HF_TOKEN, the download cache under `home`. huggingface_hub reads
    these once, at import, so they are patched where it keeps them too."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(home) / "hub"))


class HubError(Exception):
    """An HTTP error answer: status and message."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


class GitRepo:
    """One bare repository, written through plumbing commands under a lock."""

    def __init__(self, path: Path) -> None:
        self.path, self.lock = path, threading.Lock()

    def git(self, *args: str, data: bytes | None = None, env: dict | None = None) -> bytes:
        proc = subprocess.run(["git", "--git-dir", str(self.path), *args], input=data, capture_output=True,
                              env={**os.environ, **GIT_ENV, **(env or {})})
        if proc.returncode != 0:
            raise HubError(404, proc.stderr.decode(errors="replace").strip()[:200])
        return proc.stdout

    def resolve(self, revision: str) -> str:
        """A branch, tag or commit id -> the commit id."""
        for ref in (f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
            try:
                return self.git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}").decode().strip()
            except HubError:
                continue
        raise HubError(404, f"Revision Not Found: {revision}")

    def files(self, commit: str) -> dict[str, tuple[str, int]]:
        """path -> (blob id, size) at a commit."""
        out = {}
        for line in self.git("ls-tree", "-r", "-l", "-z", commit).split(b"\0"):
            if line:
                meta, path = line.decode().split("\t", 1)
                _, _, blob, size = meta.split()
                out[path] = (blob, int(size))
        return out

    def commit(self, parent: str | None, adds: dict[str, bytes], deletes: list[str], folders: list[str],
               message: str) -> str:
        """A new commit on top of `parent` with the files added and removed; its id."""
        with tempfile.TemporaryDirectory() as scratch:
            env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}  # a fresh index of its own
            if parent:
                self.git("read-tree", parent, env=env)
            current = self.files(parent) if parent else {}
            gone = deletes + [p for f in folders for p in current if p.startswith(f.rstrip("/") + "/")]
            for path in gone:
                self.git("update-index", "--force-remove", "--", path, env=env)
            for path, content in adds.items():
                blob = self.git("hash-object", "-w", "--stdin", data=content).decode().strip()
                self.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
            tree = self.git("write-tree", env=env).decode().strip()
        return self.git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", message).decode().strip()

    def log(self, commit: str) -> list[dict[str, Any]]:
        """Commits reachable from `commit`, newest first, as the Hub lists them."""
        out = []
        for entry in self.git("log", "--format=%H%x00%s%x00%B%x00%at%x1e", commit).decode().split("\x1e"):
            if entry.strip():
                sha, title, body, stamp = entry.strip("\n").split("\x00")
                date = datetime.fromtimestamp(int(stamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                out.append({"id": sha, "title": title, "message": body.strip(), "authors": [{"user": "hub"}],
                            "date": date})
        return out


class HubServer:
    """The server: `with HubServer(tmp).start() as hub: HfApi(endpoint=hub.endpoint, token=hub.token)`."""

    def __init__(self, root: Path, token: str = "hf_test_token", commit_delay: float = 0.0) -> None:
        self.root, self.token, self.commit_delay = Path(root), token, commit_delay
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []
        self.seen_authorization: list[str] = []
        self._repos: dict[str, GitRepo] = {}
        self._server: ThreadingHTTPServer | None = None
        self.connections: set[socket.socket] = set()  # open client connections (keep-alive)
        self._last_blob: tuple[str, bytes] = ("", b"")

    def start(self) -> "HubServer":
        hub = self

        class Handler(HubHandler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Go away as a crashed server does: no new connections, and the open ones (keep-alive) cut."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo(self, repo_type: str, repo_id: str, create: bool = False) -> GitRepo:
        key = f"{repo_type}s/{repo_id}"
        path = self.root / f"{key}.git"
        if key not in self._repos:
            if not path.exists():
                if not create:
                    raise HubError(404, f"Repository Not Found: {key}")
                path.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True, env={**os.environ, **GIT_ENV})
            self._repos[key] = GitRepo(path)
        return self._repos[key]

    def blob(self, repo: GitRepo, blob_id: str) -> bytes:
        """A blob's bytes; the last one read is kept, as range reads (HfFileSystem on Parquet) ask for it often."""
        if self._last_blob[0] != blob_id:
            self._last_blob = (blob_id, repo.git("cat-file", "blob", blob_id))
        return self._last_blob[1]

    # Helpers for assertions.
    def commits(self, repo_id: str, revision: str, repo_type: str = "model") -> list[str]:
        """Commit titles of a revision, newest first."""
        return [title for _, title in self.commit_ids(repo_id, revision, repo_type)]

    def commit_ids(self, repo_id: str, revision: str, repo_type: str = "model") -> list[tuple[str, str]]:
        """(commit id, title) of a revision's commits, newest first."""
        repo = self.repo(repo_type, repo_id)
        return [(c["id"], c["title"]) for c in repo.log(repo.resolve(revision))]

    def files(self, repo_id: str, revision: str, repo_type: str = "model") -> dict[str, bytes]:
        """path -> content at a revision."""
        repo = self.repo(repo_type, repo_id)
        return {p: repo.git("cat-file", "blob", blob) for p, (blob, _) in repo.files(repo.resolve(revision)).items()}


class HubHandler(BaseHTTPRequestHandler):
    """Routes the Hub's REST calls to the repos of `server_hub`."""

    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server_hub.connections.add(self.connection)

    def finish(self) -> None:
        self.server_hub.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        hub.requests.append((method, url.path))
        auth = self.headers.get("Authorization", "")
        if auth:
            hub.seen_authorization.append(auth)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            if method == "POST" and auth != f"Bearer {hub.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts[0] == "api":
                self._api(method, parts[1:], parse_qs(url.query), body)
            else:
                self._resolve(method, parts)
        except HubError as e:
            self._json({"error": str(e), **e.extra}, e.status, head=method == "HEAD")

    def _json(self, data: Any, status: int = 200, head: bool = False) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if status >= 400:
            message = str(data.get("error", "")) if isinstance(data, dict) else ""
            self.send_header("X-Error-Message", message[:200])
            code = next((c for prefix, c in ERROR_CODES.items() if message.startswith(prefix)), None)
            if code:  # a HEAD answer has no body to say it
                self.send_header("X-Error-Code", code)
        self.end_headers()
        if not head:
            self.wfile.write(raw)

    def _api(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        hub = self.server_hub
        if parts[:2] == ["repos", "create"]:
            return self._create_repo(json.loads(body))
        if parts[0] == "validate-yaml":  # a README.md's metadata block, checked as the Hub does before a commit
            return self._validate_yaml(json.loads(body)["content"])
        kind, repo_id, action, rest = parts[0].rstrip("s"), "/".join(parts[1:3]), parts[3:4], parts[4:]
        repo = hub.repo(kind, repo_id)
        action = action[0] if action else "info"
        if action in ("info", "revision"):
            return self._info(repo, repo_id, "/".join(rest) or "main")
        if action == "refs":
            return self._json(self._refs(repo))
        if action == "commits":
            return self._json(repo.log(repo.resolve("/".join(rest) or "main")))
        if action == "tree":
            return self._tree(repo, rest[0], "/".join(rest[1:]), query.get("recursive", ["false"])[0] == "true")
        if action == "paths-info":
            return self._paths_info(repo, rest[0], body)
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if action == "commit":
            return self._commit(repo, kind, repo_id, "/".join(rest), body)
        if action == "branch":
            return self._ref(repo, f"refs/heads/{'/'.join(rest)}", json.loads(body or b"{}").get("startingPoint"))
        if action == "tag":
            data = json.loads(body)
            return self._ref(repo, f"refs/tags/{data['tag']}", "/".join(rest))
        raise HubError(404, f"unknown endpoint {action}")

    def _create_repo(self, data: dict) -> None:
        kind = data.get("type") or "model"
        repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else f"user/{data['name']}"
        prefix = "" if kind == "model" else f"{kind}s/"
        url = f"{self.server_hub.endpoint}/{prefix}{repo_id}"
        if (self.server_hub.root / f"{kind}s/{repo_id}.git").exists():  # the Hub's 409 carries the url too
            raise HubError(409, "You already created this repo", url=url)
        repo = self.server_hub.repo(kind, repo_id, create=True)
        with repo.lock:
            head = repo.commit(None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, [], [],
                               "initial commit")
            repo.git("update-ref", "refs/heads/main", head)
        self._json({"url": url, "name": repo_id})

    def _validate_yaml(self, content: str) -> None:
        import yaml

        front = content.split("---", 2)[1] if content.startswith("---") and content.count("---") >= 2 else ""
        try:
            meta = yaml.safe_load(front) if front.strip() else {}
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": str(e)[:200]}]}, 400)
        if not isinstance(meta, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
        self._json({"warnings": []})

    def _info(self, repo: GitRepo, repo_id: str, revision: str) -> None:
        sha = repo.resolve(revision)
        siblings = [{"rfilename": p, "size": size, "blobId": blob} for p, (blob, size) in repo.files(sha).items()]
        self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": True, "siblings": siblings,
                    "lastModified": repo.log(sha)[0]["date"], "tags": [], "downloads": 0, "likes": 0,
                    "author": repo_id.split("/")[0], "disabled": False, "gated": False})

    def _refs(self, repo: GitRepo) -> dict[str, Any]:
        refs: dict[str, list] = {"branches": [], "tags": [], "converts": []}
        for line in repo.git("for-each-ref", "--format=%(refname) %(objectname)").decode().splitlines():
            ref, sha = line.split()
            kind, name = ("branches", ref[11:]) if ref.startswith("refs/heads/") else ("tags", ref[10:])
            refs[kind].append({"name": name, "ref": ref, "targetCommit": sha})
        return refs

    def _ref(self, repo: GitRepo, ref: str, start: str | None) -> None:
        with repo.lock:
            if repo.git("for-each-ref", ref).strip():
                raise HubError(409, f"Reference already exists: {ref}")
            repo.git("update-ref", ref, repo.resolve(start or "main"))
        self._json({})

    def _tree(self, repo: GitRepo, revision: str, path: str, recursive: bool) -> None:
        files = repo.files(repo.resolve(revision))
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, dirs = [], set()
        for p, (blob, size) in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # the directories on the way
                d = prefix + "/".join(rel[:depth])
                if (recursive or depth == 1) and d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
            if recursive or len(rel) == 1:
                entries.append({"type": "file", "oid": blob, "size": size, "path": p})
        if prefix and not entries:
            raise HubError(404, f"Entry Not Found: {path}")
        self._json(entries)

    def _paths_info(self, repo: GitRepo, revision: str, body: bytes) -> None:
        try:
            paths = json.loads(body)["paths"]
        except ValueError:
            paths = parse_qs(body.decode()).get("paths", [])
        files = repo.files(repo.resolve(revision))
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append({"type": "file", "oid": files[p][0], "size": files[p][1], "path": p})
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
        self._json(out)

    def _commit(self, repo: GitRepo, kind: str, repo_id: str, revision: str, body: bytes) -> None:
        time.sleep(self.server_hub.commit_delay)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        adds = {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in lines if i["key"] == "file"}
        deletes = [i["value"]["path"] for i in lines if i["key"] == "deletedFile"]
        folders = [i["value"]["path"] for i in lines if i["key"] == "deletedFolder"]
        message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
        with repo.lock:
            if not repo.git("for-each-ref", f"refs/heads/{revision}").strip():
                raise HubError(404, f"Invalid rev id: {revision}")
            parent = repo.resolve(revision)
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, "A commit has happened since the parent commit")
            sha = repo.commit(parent, adds, deletes, folders, message)
            repo.git("update-ref", f"refs/heads/{revision}", sha, parent)
        prefix = "" if kind == "model" else f"{kind}s/"
        self._json({"commitUrl": f"{self.server_hub.endpoint}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                    "success": True})

    def _resolve(self, method: str, parts: list[str]) -> None:
        kind = parts[0].rstrip("s") if parts[0] in ("datasets", "spaces") else "model"
        parts = parts[1:] if kind != "model" else parts
        if len(parts) < 5 or parts[2] != "resolve":
            raise HubError(404, "not found")
        repo = self.server_hub.repo(kind, "/".join(parts[:2]))
        sha = repo.resolve(parts[3])
        path = "/".join(parts[4:])
        files = repo.files(sha)
        if path not in files:
            raise HubError(404, f"Entry Not Found: {path}")
        data = self.server_hub.blob(repo, files[path][0])
        start, end, status = 0, len(data), 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            start, end, status = int(first or 0), min(len(data), int(last) + 1 if last else len(data)), 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{files[path][0]}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if method == "GET":
            self.wfile.write(data[start:end])


if __name__ == "__main__":  # a standalone server (benchmarks): python tests/loopback_hub.py ROOT TOKEN DELAY
    import sys

    server = HubServer(Path(sys.argv[1]), token=sys.argv[2], commit_delay=float(sys.argv[3])).start()
    print(server.endpoint, flush=True)
    threading.Event().wait()
