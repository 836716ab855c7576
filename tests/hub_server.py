"""A loopback stand-in for the Hugging Face Hub: the HTTP endpoints huggingface_hub's own client calls
to create a repo, make a branch, upload a folder (``HfApi.upload_folder``) and download a snapshot
(``snapshot_download``). Point the client at it with HF_ENDPOINT=<FakeHub.url>.

It answers the same routes, JSON shapes and error headers (``X-Error-Code``) as the Hub, keeps repos,
branches and commits in memory, and checks the bearer token on writes and on private reads. One
simplification: its preupload answer puts every file in "regular" upload mode, so file contents
travel base64-encoded inside the commit request and the LFS/Xet storage protocols are not used.

    with FakeHub(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, pattern, handler name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("GET", rf"/api/models/{REPO}(/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", "tree"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_blob_oid(content: bytes) -> str:
    """The Hub's oid (and ETag) of a regular file: git's blob sha1."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """In-memory repos behind a ThreadingHTTPServer on 127.0.0.1 (a free port)."""

    def __init__(self, token: str, user: str = "hftl-tester"):
        self.token, self.user = token, user
        self.repos: dict[str, dict] = {}  # id -> {"private", "refs": {branch: oid}, "commits": {oid: {path: bytes}}}
        self.requests: list[dict] = []  # method, path and headers of every request, for assertions
        self.tamper: dict[str, bytes] = {}  # path in repo -> bytes served instead of what was committed
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["refs"].get(rev, rev)]

    # ------------------------------------------------------------ helpers

    def _authorized(self, headers) -> bool:
        return headers.get("authorization", "") == f"Bearer {self.token}"

    def _repo(self, repo_id: str, headers, write: bool = False) -> dict:
        repo = self.repos.get(repo_id)
        if write and not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")
        if repo is None or (repo["private"] and not self._authorized(headers)):
            # Like the Hub: a private repo looks absent to anyone without its token.
            raise HubError(404 if self._authorized(headers) else 401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_oid(repo: dict, rev: str) -> str:
        rev = unquote(rev)
        if rev in repo["refs"]:
            return repo["refs"][rev]
        if rev in repo["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(self, repo: dict, files: dict[str, bytes], message: str) -> str:
        oid = hashlib.sha1(f"{len(repo['commits'])}:{message}".encode() + json.dumps(sorted(files)).encode()).hexdigest()
        repo["commits"][oid] = files
        return oid

    # ------------------------------------------------------------ endpoints: (params, headers, body) -> (status, headers, body)

    def create_repo(self, m, q, headers, body):
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = {"private": payload.get("visibility") == "private", "refs": {}, "commits": {}}
        repo["refs"]["main"] = self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
        self.repos[repo_id] = repo
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, m, q, headers, body):
        content = json.loads(body)["content"]
        parts = content.split("---\n")
        try:
            meta = yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) > 2 else {}
        except yaml.YAMLError as e:
            return 400, {}, {"errors": [{"message": str(e)}], "warnings": []}
        if not isinstance(meta, dict):
            return 400, {}, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def whoami(self, m, q, headers, body):
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")
        return 200, {}, {"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token"}}

    def preupload(self, m, q, headers, body):
        repo = self._repo(m["repo"], headers, write=True)
        existing = repo["commits"][self._commit_oid(repo, m["rev"])]
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None}
                 for f in json.loads(body)["files"]]
        return 200, {}, {"files": files}

    def commit(self, m, q, headers, body):
        repo = self._repo(m["repo"], headers, write=True)
        branch = unquote(m["rev"])
        if branch not in repo["refs"]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo["commits"][repo["refs"][branch]])
        message = ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif item["key"] == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile: never asked for, since preupload answers "regular" for every file
                raise HubError(400, f"this fake Hub stores files inline only; got a '{item['key']}' operation")
        oid = repo["refs"][branch] = self._new_commit(repo, files, message)
        return 200, {}, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{m['repo']}/commit/{oid}", "pullRequestUrl": None}

    def create_branch(self, m, q, headers, body):
        repo = self._repo(m["repo"], headers, write=True)
        branch = unquote(m["branch"])
        if branch in repo["refs"]:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo["refs"][branch] = self._commit_oid(repo, start)
        return 200, {}, {}

    def repo_info(self, m, q, headers, body):
        repo = self._repo(m["repo"], headers)
        oid = self._commit_oid(repo, m["rev"] or "main")
        return 200, {}, {"id": m["repo"], "sha": oid, "private": repo["private"],
                         "siblings": [{"rfilename": p} for p in sorted(repo["commits"][oid])]}

    def tree(self, m, q, headers, body):
        repo = self._repo(m["repo"], headers)
        files = repo["commits"][self._commit_oid(repo, m["rev"])]
        prefix = unquote(m["path"] or "/").strip("/")
        prefix = prefix + "/" if prefix else ""
        recursive = q.get("recursive", ["false"])[0].lower() in ("true", "1")
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for i in range(1, len(rest) if recursive else min(2, len(rest))):
                folders.add(prefix + "/".join(rest[:i]))
            if recursive or len(rest) == 1:
                entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_oid(files[path])})
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return 200, {}, entries

    def resolve(self, m, q, headers, body):
        repo = self._repo(m["repo"], headers)
        oid = self._commit_oid(repo, m["rev"])
        path = unquote(m["path"])
        if path not in repo["commits"][oid]:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = self.tamper.get(path, repo["commits"][oid][path])
        return 200, {"X-Repo-Commit": oid, "ETag": f'"{git_blob_oid(content)}"', "Content-Type": "application/octet-stream"}, content


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

        def log_message(self, *args):  # the test reads hub.requests instead
            pass

        def _dispatch(self):
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with hub._lock:
                hub.requests.append({"method": self.command, "path": url.path, "headers": dict(self.headers)})
            for method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if method == self.command and match:
                    try:
                        with hub._lock:
                            status, headers, payload = getattr(hub, name)(match.groupdict(), parse_qs(url.query), self.headers, body)
                    except HubError as e:
                        status, payload = e.status, {"error": e.message, **e.extra}
                        headers = {"X-Error-Code": e.code, "X-Error-Message": e.message} if e.code else {"X-Error-Message": e.message}
                    break
            else:
                status, headers, payload = 404, {"X-Error-Message": "no such route"}, {"error": f"fake Hub has no route {self.command} {url.path}"}
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

    return Handler
