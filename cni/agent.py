"""The CNI node agent: enrollment, in-pod capture and the hand-over of pods to ztunnel.

One agent runs per node.  It learns about pods from two directions:

- the chained CNI plugin (``cni/plugin.py``) reports every pod sandbox the runtime creates
  or deletes on this node (netns, IPs, interfaces), over ``<run_dir>/pluginevent.sock``;
- a cluster source (the Kubernetes API, or a local manifests file) says what each pod and
  namespace is labelled, so enrollment follows label changes on *running* pods.

For a pod that should be captured (:func:`cni.enroll.decide`) the agent programs capture
inside its netns with the configured backend (iptables, nftables or eBPF), adds its IP to the
node's kubelet probe-SNAT set, and hands the pod to ztunnel over ZDS (netns fd by
SCM_RIGHTS).  It writes the ``ambient.istio.io/redirection`` annotation in Kubernetes mode.

Invariants:
- **Fail closed.**  Capture is applied *before* a new pod is reported ready; if ztunnel does
  not acknowledge the pod, the CNI ADD fails (the runtime retries) and the rules stay, so the
  pod never runs uncaptured.  A pod that should be captured but is not acknowledged by
  ztunnel keeps its rules: its traffic is refused, never sent in plaintext.
- **Single writer.**  Every change of the agent's state runs under one lock on one event
  loop; backend calls (which shell out) run in a worker thread under that lock.
- **Restart-safe.**  The state (the pods seen on this node and whether they are captured) is
  checkpointed with msgpack after every change.  After a restart the agent reloads it, waits
  for the cluster source, re-applies or removes rules so the kernel matches the decisions,
  and only then opens the ZDS socket, so a reconnecting ztunnel gets a complete snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import msgpack

from cni.capture.base import CaptureBackend, CaptureError, PodCapture
from cni.enroll import (
    BYPASS_INBOUND,
    DEFAULT_EXCLUDED,
    REDIRECTION_ANNOTATION,
    PodMeta,
    decide,
    pod_meta_from_object,
)
from cni.events import AgentReply, PluginEvent
from cni.zds import ZdsPod
from controlplane.objects import Update

log = logging.getLogger("cni.agent")

CHECKPOINT_VERSION = 1
CODE_TRY_AGAIN = 11  # CNI "try again later"
CODE_CAPTURE_FAILED = 100
CODE_ZTUNNEL = 101


class ZdsLike(Protocol):
    async def add(self, pod: ZdsPod) -> None: ...
    async def delete(self, uid: str) -> list[str]: ...


class ProbeSnatLike(Protocol):
    def add_pod_ip(self, ip: str) -> None: ...
    def remove_pod_ip(self, ip: str) -> None: ...


Annotate = Callable[[str, str, str | None], Awaitable[None]]  # (namespace, name, value|None)


@dataclass
class AgentPod:
    """A pod sandbox on this node, as the CNI plugin reported it."""

    uid: str
    name: str
    namespace: str
    netns: str
    container_id: str = ""
    ips: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=lambda: ["eth0"])
    captured: bool = False  # capture rules are in place
    acked: bool = False  # ztunnel acknowledged the pod
    service_account: str = "default"
    inbound_capture: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def capture_spec(self) -> PodCapture:
        return PodCapture(uid=self.uid, name=self.name, namespace=self.namespace,
                          netns=self.netns, ips=tuple(self.ips),
                          interfaces=tuple(self.interfaces),
                          inbound_capture=self.inbound_capture)

    def zds_pod(self) -> ZdsPod:
        return ZdsPod(uid=self.uid, name=self.name, namespace=self.namespace,
                      service_account=self.service_account, netns=self.netns)


@dataclass
class AgentConfig:
    node_name: str = ""
    state_path: str = "/var/run/ambient-cni/agent-state.msgpack"
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED
    meta_wait_s: float = 10.0  # how long an ADD waits for the cluster source to know the pod
    retry_interval_s: float = 2.0  # re-offer captured pods ztunnel has not acknowledged


class NodeAgent:
    """The agent's state machine; the asyncio edges (sockets, sources) live in ``agent_main``."""

    def __init__(self, config: AgentConfig, backend: CaptureBackend, zds: ZdsLike,
                 probe: ProbeSnatLike | None = None, annotate: Annotate | None = None) -> None:
        self.config = config
        self.backend = backend
        self.zds = zds
        self.probe = probe
        self.annotate = annotate
        self.pods: dict[str, AgentPod] = {}  # uid -> pod
        self.metas: dict[str, PodMeta] = {}  # "ns/name" -> cluster view
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.synced = asyncio.Event()
        self._lock = asyncio.Lock()
        self._meta_changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- cluster source ------------------------------------------------------------------

    def on_update(self, update: Update) -> None:
        """Sink for a cluster source: keep the Pod and Namespace view, then reconcile."""
        if update.resync:
            self.metas.clear()
            self.namespace_labels.clear()
        for key in update.deletes:
            kind, ns, name = key.split("/", 2)
            if kind == "Pod":
                self.metas.pop(f"{ns}/{name}", None)
            elif kind == "Namespace":
                self.namespace_labels.pop(name, None)
        for key, obj in update.upserts.items():
            kind = key.split("/", 1)[0]
            if kind == "Pod":
                m = pod_meta_from_object(obj)
                if not m.node or not self.config.node_name or m.node == self.config.node_name:
                    self.metas[m.key] = m
            elif kind == "Namespace":
                meta = obj.get("metadata") or {}
                self.namespace_labels[str(meta.get("name"))] = {
                    str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        self.synced.set()
        task = asyncio.get_running_loop().create_task(self._notify_and_reconcile())
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _notify_and_reconcile(self) -> None:
        async with self._meta_changed:
            self._meta_changed.notify_all()
        await self.reconcile()

    async def _meta_for(self, namespace: str, name: str) -> PodMeta | None:
        key = f"{namespace}/{name}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.meta_wait_s
        async with self._meta_changed:
            while key not in self.metas or not self.synced.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._meta_changed.wait(), left)
        return self.metas[key]

    def _decide(self, meta: PodMeta) -> bool:
        ns_labels = self.namespace_labels.get(meta.namespace, {})
        return decide(meta, ns_labels, tuple(self.config.excluded_namespaces)).capture

    # -- plugin events -------------------------------------------------------------------

    async def handle_event(self, ev: PluginEvent) -> AgentReply:
        try:
            if ev.cmd == "add":
                return await self._add(ev)
            if ev.cmd == "del":
                return await self._del(ev)
            if ev.cmd == "check":
                return await self._check(ev)
            return AgentReply(ok=False, enrolled=False, code=4,
                              message=f"unknown event {ev.cmd!r}")
        except Exception as e:  # a bug must fail the pod (closed), not kill the agent
            log.exception("event %s for %s/%s failed", ev.cmd, ev.pod_namespace, ev.pod_name)
            return AgentReply(ok=False, enrolled=False, code=CODE_CAPTURE_FAILED,
                              message=f"node agent error: {e}")

    async def _add(self, ev: PluginEvent) -> AgentReply:
        meta = await self._meta_for(ev.pod_namespace, ev.pod_name)
        if meta is None:
            return AgentReply(
                ok=False, enrolled=False, code=CODE_TRY_AGAIN,
                message=f"pod {ev.pod_namespace}/{ev.pod_name} is not known to the node agent "
                        f"yet (cluster source not synced or pod not listed); the runtime will "
                        f"retry")
        uid = ev.pod_uid or meta.uid or ev.container_id
        async with self._lock:
            pod = AgentPod(uid=uid, name=ev.pod_name, namespace=ev.pod_namespace,
                           netns=ev.netns, container_id=ev.container_id, ips=list(ev.ips),
                           interfaces=list(ev.interfaces) or ["eth0"],
                           service_account=meta.service_account,
                           inbound_capture=meta.annotations.get(BYPASS_INBOUND) != "true")
            old = self.pods.get(uid)
            if old is not None and old.netns != pod.netns and old.captured:
                await self._unenroll(old)
            self.pods[uid] = pod
            self._save()
            if not self._decide(meta):
                return AgentReply(ok=True, enrolled=False, code=0, message="not enrolled")
            err = await self._enroll(pod, ztunnel_first=False)
        if err:
            return AgentReply(ok=False, enrolled=True, code=err[0], message=err[1])
        return AgentReply(ok=True, enrolled=True, code=0, message="captured")

    async def _del(self, ev: PluginEvent) -> AgentReply:
        async with self._lock:
            pod = self.pods.get(ev.pod_uid) if ev.pod_uid else None
            if pod is None:
                pod = next((p for p in self.pods.values()
                            if p.container_id and p.container_id == ev.container_id), None)
            if pod is None:
                return AgentReply(ok=True, enrolled=False, code=0, message="unknown pod")
            errors = await self._unenroll(pod, pod_deleted=True)
            self.pods.pop(pod.uid, None)
            self._save()
        if errors:
            log.warning("DEL %s: %s", pod.key, "; ".join(errors))
        return AgentReply(ok=True, enrolled=False, code=0, message="; ".join(errors))

    async def _check(self, ev: PluginEvent) -> AgentReply:
        async with self._lock:
            pod = self.pods.get(ev.pod_uid) if ev.pod_uid else None
            if pod is None or not pod.captured:
                return AgentReply(ok=True, enrolled=False, code=0, message="not captured")
            drift = await asyncio.to_thread(self.backend.check, pod.capture_spec())
        if drift:
            return AgentReply(ok=False, enrolled=True, code=CODE_CAPTURE_FAILED,
                              message="capture drifted: " + "; ".join(drift))
        return AgentReply(ok=True, enrolled=True, code=0, message="captured")

    # -- enrollment ----------------------------------------------------------------------

    async def _enroll(self, pod: AgentPod, *, ztunnel_first: bool) -> tuple[int, str] | None:
        """Capture ``pod`` and hand it to ztunnel (caller holds the lock).

        ``ztunnel_first`` (late enrollment of a running pod) opens ztunnel's listeners before
        the redirection so no connection is refused on the way; rules are applied either way.
        """
        v6 = [ip for ip in pod.ips if ":" in ip]
        if v6:  # capture is IPv4-only: refuse rather than leave IPv6 traffic uncaptured
            return CODE_CAPTURE_FAILED, (
                f"pod {pod.key} has IPv6 addresses {v6}, and ambient capture is IPv4-only in "
                f"this release; give ambient pods IPv4 only or opt the pod out with "
                f"istio.io/dataplane-mode=none")
        zerr: str | None = None
        if ztunnel_first:
            zerr = await self._zds_add(pod)
        try:
            await asyncio.to_thread(self.backend.apply, pod.capture_spec())
        except CaptureError as e:
            pod.captured = True  # partial rules may exist: remove them on DEL/unenroll
            self._save()
            return CODE_CAPTURE_FAILED, (f"cannot capture {pod.key} with the "
                                         f"{self.backend.name} backend: {e}")
        pod.captured = True
        if self.probe is not None:
            for ip in pod.ips:
                await asyncio.to_thread(self.probe.add_pod_ip, ip)
        self._save()
        if not ztunnel_first:
            zerr = await self._zds_add(pod)
        if zerr:
            return CODE_ZTUNNEL, zerr
        await self._annotate(pod, "enabled")
        log.info("captured %s (%s backend)", pod.key, self.backend.name)
        return None

    async def _zds_add(self, pod: AgentPod) -> str | None:
        try:
            await self.zds.add(pod.zds_pod())
        except Exception as e:
            pod.acked = False
            return (f"ztunnel did not accept {pod.key}: {e}; the pod stays captured (its "
                    f"traffic is refused) until ztunnel is up")
        pod.acked = True
        return None

    async def _unenroll(self, pod: AgentPod, *, pod_deleted: bool = False) -> list[str]:
        """Hand the pod back: ztunnel first, then the rules (caller holds the lock)."""
        errors = list(await self.zds.delete(pod.uid))
        pod.acked = False
        if pod.captured:
            errors += await asyncio.to_thread(self.backend.remove, pod.capture_spec())
            if self.probe is not None:
                for ip in pod.ips:
                    await asyncio.to_thread(self.probe.remove_pod_ip, ip)
            pod.captured = False
        if not pod_deleted:
            await self._annotate(pod, None)
            log.info("released %s from the mesh", pod.key)
        self._save()
        return errors

    async def _annotate(self, pod: AgentPod, value: str | None) -> None:
        if self.annotate is None:
            return
        try:
            await self.annotate(pod.namespace, pod.name, value)
        except Exception as e:  # the annotation is informative; capture does not depend on it
            log.warning("cannot set %s on %s: %s", REDIRECTION_ANNOTATION, pod.key, e)

    async def reconcile(self) -> None:
        """Make every known pod's capture match its decision (label changes, restarts)."""
        async with self._lock:
            for pod in list(self.pods.values()):
                if not os.path.exists(pod.netns):
                    log.info("netns of %s is gone; forgetting it", pod.key)
                    await self._unenroll(pod, pod_deleted=True)
                    self.pods.pop(pod.uid, None)
                    continue
                meta = self.metas.get(pod.key)
                if meta is None:
                    continue  # the cluster no longer lists it: CNI DEL will follow
                want = self._decide(meta)
                if want and not pod.captured:
                    failed = await self._enroll(pod, ztunnel_first=True)
                    if failed:
                        log.warning("late enrollment of %s: %s", pod.key, failed[1])
                elif not want and pod.captured:
                    await self._unenroll(pod)
                elif want and not pod.acked and await self._zds_add(pod) is None:
                    await self._annotate(pod, "enabled")
            self._save()

    async def restore(self) -> None:
        """After a restart: reload the checkpoint and re-apply rules of captured pods."""
        for pod in load_checkpoint(self.config.state_path):
            self.pods[pod.uid] = pod
        async with self._lock:
            for pod in list(self.pods.values()):
                if not os.path.exists(pod.netns):
                    if pod.captured:
                        await asyncio.to_thread(self.backend.remove, pod.capture_spec())
                    self.pods.pop(pod.uid, None)
                elif pod.captured:
                    try:
                        await asyncio.to_thread(self.backend.apply, pod.capture_spec())
                    except CaptureError as e:
                        log.error("cannot restore capture of %s: %s", pod.key, e)
                    pod.acked = False  # the next ztunnel snapshot carries it
            self._save()
        log.info("restored %d pods from %s", len(self.pods), self.config.state_path)

    async def retry_loop(self) -> None:
        """Re-offer captured pods that ztunnel has not acknowledged yet, and forget pods whose
        netns vanished without a CNI DEL (else ztunnel would hold the dead netns open)."""
        while True:
            await asyncio.sleep(self.config.retry_interval_s)
            if any((p.captured and not p.acked) or not os.path.exists(p.netns)
                   for p in self.pods.values()):
                await self.reconcile()

    def snapshot(self) -> list[ZdsPod]:
        """The pods a (re)connecting ztunnel must serve: every captured pod."""
        return [p.zds_pod() for p in self.pods.values() if p.captured]

    def dump(self) -> dict[str, Any]:
        return {"node": self.config.node_name, "backend": self.backend.name,
                "pods": [asdict(p) for p in self.pods.values()]}

    # -- checkpoint ----------------------------------------------------------------------

    def _save(self) -> None:
        save_checkpoint(self.config.state_path, list(self.pods.values()))


def save_checkpoint(path: str, pods: list[AgentPod]) -> None:
    """Write the pods atomically (temp file + rename) as msgpack."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = msgpack.packb({"version": CHECKPOINT_VERSION, "pods": [asdict(p) for p in pods]})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".agent-state.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> list[AgentPod]:
    """Pods from a checkpoint; a missing file is empty, a corrupt one is logged and ignored."""
    try:
        with open(path, "rb") as f:
            data = msgpack.unpackb(f.read())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, msgpack.UnpackException) as e:
        log.error("ignoring unreadable checkpoint %s (%s); pods will be re-learned from CNI "
                  "events and the cluster", path, e)
        return []
    if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
        log.error("ignoring checkpoint %s of an unknown version", path)
        return []
    pods: list[AgentPod] = []
    known = set(AgentPod.__dataclass_fields__)
    for raw in data.get("pods") or []:
        try:
            pods.append(AgentPod(**{k: v for k, v in raw.items() if k in known}))
        except TypeError as e:
            log.error("skipping a malformed pod in checkpoint %s: %s", path, e)
    return pods
