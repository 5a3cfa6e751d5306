"""Peer names from the cluster's Node objects (`[kubernetes] enabled = true`).

A thread beside the agent's loop lists the Nodes (in pages), then watches
them from the list's resourceVersion with bookmarks, with the official
`kubernetes` client. Each node's InternalIP and ExternalIP addresses become a
/32 (or /128) peer named by the node's name, its zone the label
topology.kubernetes.io/zone; with pod_cidrs, spec.podCIDRs map to it too.
This node's own zone comes from its own Node (found by node_name).

- 410 Gone (the server forgot the resourceVersion: an ERROR event, which the
  client raises as ApiException(410) since it does not retry when
  timeout_seconds is set, or the HTTP status itself): list again.
- Any other failure (API server down, slow, refusing): the last known names
  stay, the thread retries after a capped exponential back-off; the agent's
  loop never waits for it (poll() only takes what the thread has published).
- Only what the names need is kept per node (NodeInfo), never the objects:
  Nodes carry status.images, often tens of kilobytes each.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from ebpf_telemetry.config import Kubernetes, Network, peer_name_problem
from ebpf_telemetry.naming import PeerTable

log = structlog.get_logger("kubenodes")

ZONE_LABEL = "topology.kubernetes.io/zone"
ADDRESS_TYPES = ("InternalIP", "ExternalIP")
PAGE = 100  # Nodes per list request: what one page costs in memory, at most (measured:
# 5,000 Nodes of 30 images: RSS +9 MB at 100 against +25 MB at 500)
WATCH_SECONDS = 300  # the server ends each watch after this; the thread watches on
CONNECT_SECONDS = 5.0
READ_SECONDS = 30.0  # a list, or a watch beyond its WATCH_SECONDS, slower than this fails
GONE = 410


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What naming needs of one Node."""

    name: str
    addresses: tuple[str, ...]
    zone: str
    pod_cidrs: tuple[str, ...]


def node_info(node: dict[str, Any]) -> NodeInfo:
    """From a Node as the API sends it (JSON)."""
    meta, status, spec = node["metadata"], node.get("status") or {}, node.get("spec") or {}
    addresses = tuple(
        a["address"]
        for a in status.get("addresses") or ()
        if a.get("type") in ADDRESS_TYPES and a.get("address")
    )
    return NodeInfo(
        name=meta["name"],
        addresses=addresses,
        zone=(meta.get("labels") or {}).get(ZONE_LABEL, ""),
        pod_cidrs=tuple(spec.get("podCIDRs") or ()),
    )


class RawWatch(watch.Watch):  # type: ignore[misc]
    """The client's Watch (its ERROR and 410 handling, its stream), with
    events left as JSON: its models cost about 7 ms and tens of kilobytes a
    Node (measured: a list of 5,000 took 37 s and 80 MB more through them)."""

    def unmarshal_event(self, data: str, return_type: Any) -> dict[str, Any] | None:
        if not data or data.isspace():
            return None
        try:
            event: dict[str, Any] = json.loads(data)
        except json.JSONDecodeError:
            return None
        event["raw_object"] = event["object"]
        return event


def _networks(info: NodeInfo, pod_cidrs: bool) -> list[Network]:
    nets = []
    for text in info.addresses + (info.pod_cidrs if pod_cidrs else ()):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            log.debug("not an address", node=info.name, value=text)
    return nets


def table_of(nodes: dict[str, NodeInfo], own: str, pod_cidrs: bool) -> PeerTable:
    """The peer table of the Nodes known; an address claimed twice goes to the
    first node by name."""
    peers: dict[str, tuple[Network, ...]] = {}
    zones: dict[str, str] = {}
    owner: set[Network] = set()
    for name in sorted(nodes):
        info = nodes[name]
        if peer_name_problem(name):
            continue  # warned when it came (_bad_name)
        nets = tuple(n for n in _networks(info, pod_cidrs) if n not in owner)
        owner.update(nets)
        if nets:
            peers[name] = nets
            zones[name] = info.zone
    mine = nodes.get(own)
    return PeerTable(peers, zones, mine.zone if mine is not None else None)


def api_client(kubeconfig: str | None) -> Any:
    """A client of its own: the configured kubeconfig; else the in-cluster
    service account, then $KUBECONFIG (or ~/.kube/config), as kubectl does."""
    conf = client.Configuration()
    if kubeconfig:
        kube_config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
    else:
        try:
            kube_config.load_incluster_config(client_configuration=conf)
        except ConfigException:  # $KUBECONFIG as it is now (the client reads it at import)
            path = os.environ.get("KUBECONFIG") or "~/.kube/config"
            kube_config.load_kube_config(config_file=path, client_configuration=conf)
    return client.ApiClient(conf)


class KubeNodes:
    """A naming.Source: the Node watch, in its own thread."""

    name = "kubernetes"

    def __init__(
        self,
        node_name: str,
        cfg: Kubernetes,
        backoff: tuple[float, float] = (0.5, 30.0),
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.node_name, self.cfg = node_name, cfg
        self.backoff, self.watch_seconds = backoff, watch_seconds
        self.lock = threading.Lock()
        self.nodes: dict[str, NodeInfo] = {}  # under lock
        self.changed = False  # under lock: nodes changed since the last poll()
        self.synced: float | None = None
        self.lists = 0  # full lists done (the first, and one after each 410)
        self.error: str | None = None  # of the failing streak, logged once
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubenodes", daemon=True)
        self.thread.start()

    # -- the agent's side ---------------------------------------------------------

    def poll(self) -> PeerTable | None:
        with self.lock:
            if not self.changed:
                return None
            self.changed = False
            nodes = dict(self.nodes)
        return table_of(nodes, self.node_name, self.cfg.pod_cidrs)

    def last_sync(self) -> float | None:
        return self.synced

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=1.0)  # a watch blocked in a read ends with the process

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        api: Any = None
        rv: str | None = None
        delay = self.backoff[0]
        gone = 0  # 410s in a row: the first relists at once, more back off
        while not self.stopping.is_set():
            try:
                api = api or client.CoreV1Api(api_client(self.cfg.kubeconfig))
                rv = rv or self._list(api)
                rv = self._watch(api, rv)
                delay, gone = self.backoff[0], 0
            except ApiException as e:
                if e.status == GONE:
                    log.info("node watch expired (410 Gone): listing again")
                    rv, gone = None, gone + 1
                    if gone == 1:
                        continue
                else:
                    self._failed(f"API server: {e.status} {e.reason}")
            except ConfigException as e:
                api = None
                self._failed(f"no kubeconfig: {e}")
            except Exception as e:  # down, slow, refused, bad TLS: all the same to us
                self._failed(f"{type(e).__name__}: {e}")
            else:
                continue
            self.stopping.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff[1])

    def _failed(self, why: str) -> None:
        if why != self.error:
            log.warning("node watch failed; last known names kept, retrying", error=why)
        self.error = why

    def _ok(self) -> None:
        self.synced = time.time()
        if self.error is not None:
            log.info("node watch back", nodes=len(self.nodes))
            self.error = None

    def _list(self, api: Any) -> str:
        """Every Node, page by page; their NodeInfo replaces what was known.
        Returns the list's resourceVersion."""
        nodes: dict[str, NodeInfo] = {}
        token = None
        while True:
            resp = api.list_node(
                limit=PAGE,
                _continue=token,
                _preload_content=False,
                _request_timeout=(CONNECT_SECONDS, READ_SECONDS),
            )
            page = json.loads(resp.data)
            for node in page["items"]:
                name = node["metadata"]["name"]
                self._bad_name(name)
                nodes[name] = node_info(node)
            del resp
            token = page["metadata"].get("continue")
            rv = page["metadata"]["resourceVersion"]
            del page
            if not token:
                break
        with self.lock:
            self.nodes, self.changed = nodes, True
        self.lists += 1
        self._ok()
        log.info("nodes listed", nodes=len(nodes), resource_version=rv)
        return str(rv)

    def _watch(self, api: Any, rv: str) -> str:
        """Follow changes from rv until the server ends the watch; returns
        the last resourceVersion seen (events and bookmarks)."""
        w = RawWatch()
        events = w.stream(
            api.list_node,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            _request_timeout=(CONNECT_SECONDS, self.watch_seconds + READ_SECONDS),
        )
        for event in events:
            rv = event["raw_object"]["metadata"]["resourceVersion"]
            self._event(event["type"], event["object"])
            self._ok()
            if self.stopping.is_set():
                w.stop()
        return rv

    def _event(self, kind: str, node: dict[str, Any]) -> None:
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK: a resourceVersion only
        name = node["metadata"]["name"]
        info = node_info(node)
        with self.lock:
            if kind == "DELETED":
                self.changed |= self.nodes.pop(name, None) is not None
            elif self.nodes.get(name) != info:
                self._bad_name(name)
                self.nodes[name], self.changed = info, True

    def _bad_name(self, name: str) -> None:
        problem = peer_name_problem(name)
        if problem and name not in self.nodes:
            log.warning("node not named: its traffic counts under peer=other", error=problem)
