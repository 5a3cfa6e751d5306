"""A stand-in Kubernetes API server for Node objects, on 127.0.0.1.

No kube-apiserver package exists here, so this speaks the part of its wire
protocol that a Node watch uses, for the real `kubernetes` client:
- GET /api/v1/nodes: a NodeList, in pages (limit, continue), its
  metadata.resourceVersion the store's;
- GET /api/v1/nodes?watch=true&resourceVersion=N: a chunked stream of JSON
  lines (ADDED, MODIFIED, DELETED; BOOKMARK when bookmark() is called and the
  client allowed them) from N on, ended after timeoutSeconds; an ERROR event
  with code 410 when N is older than what the store still remembers
  (expire()), as a real API server does once its watch cache moved on.
The Node objects are complete enough for the client's models (nodeInfo's
required fields, addresses, conditions, daemonEndpoints) and carry
status.images as real nodes do. stop() and start() make an outage: open
connections are cut, the port is kept.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ZONE_LABEL = "topology.kubernetes.io/zone"


def node_object(
    name: str,
    addresses: list[str],
    zone: str | None = None,
    pod_cidrs: list[str] | None = None,
    images: int = 3,
) -> dict[str, Any]:
    """A Node as kubelet reports it (addresses: InternalIP first, the rest ExternalIP)."""
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    if zone is not None:
        labels[ZONE_LABEL] = zone
    kinds = ["InternalIP"] + ["ExternalIP"] * (len(addresses) - 1)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "podCIDR": (pod_cidrs or [None])[0],
            "podCIDRs": pod_cidrs or [],
            "providerID": f"stub://{name}",
        },
        "status": {
            "addresses": [
                *({"type": k, "address": a} for k, a in zip(kinds, addresses, strict=True)),
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "7800m", "memory": "30Gi", "pods": "110"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": f"boot-{name}",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kernelVersion": "6.1.0-28-cloud-amd64",
                "kubeProxyVersion": "v1.31.4",
                "kubeletVersion": "v1.31.4",
                "machineID": f"machine-{name}",
                "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "systemUUID": f"uuid-{name}",
            },
            "images": [
                {
                    "names": [
                        f"registry.example.org/team-{i % 17}/service-{i}@sha256:{i:064x}",
                        f"registry.example.org/team-{i % 17}/service-{i}:v1.{i}.0",
                    ],
                    "sizeBytes": 50_000_000 + i,
                }
                for i in range(images)
            ],
        },
    }


class KubeStub:
    """The store (Nodes, the event history) and the HTTP server in front of it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.nodes: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, object)
        self.oldest = 0  # a watch from before this resourceVersion gets 410
        self.bookmarks = 0  # bumped by bookmark(): open watches send one
        self.gone_status = False  # answer watches with HTTP 410 instead of an ERROR event
        self.requests: list[tuple[str, str | None]] = []  # (path?query, Authorization)
        self.lists = 0
        self.watches = 0
        self.port = _free_port()
        self.server: ThreadingHTTPServer | None = None
        self.conns: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the cluster changes ---------------------------------------------------------

    def put(self, obj: dict[str, Any]) -> None:
        """Add or modify a Node."""
        with self.cond:
            self.rv += 1
            name = obj["metadata"]["name"]
            kind = "MODIFIED" if name in self.nodes else "ADDED"
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.nodes[name] = obj
            self.history.append((self.rv, kind, obj))
            self.cond.notify_all()

    def delete(self, name: str) -> None:
        with self.cond:
            self.rv += 1
            obj = self.nodes.pop(name)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, "DELETED", obj))
            self.cond.notify_all()

    def expire(self) -> None:
        """Forget the history: every watch, open or to come, from an older
        resourceVersion gets 410 Gone (the client must list again)."""
        with self.cond:
            self.rv += 1
            self.oldest = self.rv
            self.history.clear()
            self.cond.notify_all()

    def bookmark(self) -> None:
        with self.cond:
            self.rv += 1
            self.bookmarks += 1
            self.cond.notify_all()

    def authorizations(self) -> set[str | None]:
        return {auth for _, auth in self.requests}

    # -- the server ------------------------------------------------------------------

    def start(self) -> KubeStub:
        stub = self

        class Handler(_Handler):
            pass

        Handler.stub = stub
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """An outage: no more connections, the open ones (watches too) cut."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self.cond:
            for c in list(self.conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
            self.cond.notify_all()

    def __enter__(self) -> KubeStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, token: str) -> str:
        """A kubeconfig (YAML) for this server with a bearer token."""
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: stub\n  cluster:\n    server: {self.url}\n"
            f"users:\n- name: agent\n  user:\n    token: {token}\n"
            "contexts:\n- name: stub\n  context:\n    cluster: stub\n    user: agent\n"
            "current-context: stub\n"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: KubeStub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.stub.cond:
            self.stub.conns.add(self.connection)

    def finish(self) -> None:
        with self.stub.cond:
            self.stub.conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.stub.requests.append((self.path, self.headers.get("Authorization")))
        if url.path != "/api/v1/nodes":
            return self._json(404, _status(404, "NotFound", f"{url.path} not found"))
        if query.get("watch", "").lower() in ("true", "1"):
            return self._watch(query)
        return self._list(query)

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _list(self, query: dict[str, str]) -> None:
        stub = self.stub
        with stub.cond:
            stub.lists += 1
            items = [stub.nodes[n] for n in sorted(stub.nodes)]
            rv = stub.rv
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        self._json(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": page})

    def _watch(self, query: dict[str, str]) -> None:
        stub = self.stub
        since = int(query.get("resourceVersion") or 0)
        seconds = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        if stub.gone_status and since < stub.oldest:
            return self._json(410, _status(410, "Expired", f"too old resource version: {since}"))
        with stub.cond:
            stub.watches += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + seconds
        marks = stub.bookmarks
        try:
            while True:
                with stub.cond:
                    if since < stub.oldest:
                        gone = _status(410, "Expired", f"too old resource version: {since}")
                        self._chunk({"type": "ERROR", "object": gone})
                        break
                    events = [(rv, t, o) for rv, t, o in stub.history if rv > since]
                    mark = bookmarks and stub.bookmarks != marks
                    marks = stub.bookmarks
                    if not events and not mark:
                        left = deadline - time.monotonic()
                        if left <= 0 or stub.server is None:
                            break
                        stub.cond.wait(min(left, 0.5))
                        continue
                    rv_now = stub.rv
                for rv, kind, obj in events:
                    self._chunk({"type": kind, "object": obj})
                    since = rv
                if mark:
                    since = max(since, rv_now)
                    meta = {"resourceVersion": str(since)}
                    self._chunk({"type": "BOOKMARK", "object": {"kind": "Node", "metadata": meta}})
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
