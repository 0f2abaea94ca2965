"""ztunnel's ZDS client, the "workload proxy manager": pods arrive from the CNI node agent.

ztunnel connects to ``INPOD_UDS`` (a ``SOCK_SEQPACKET`` unix socket the agent serves), says
``ZdsHello{V1}``, and then applies each request the agent sends, answering every one with an
``Ack`` (empty error on success, the reason on failure):

- Add (with the pod's netns fd): open the pod's listeners in that netns.  If the pod is
  already served in the *same* netns (same ``st_dev``/``st_ino``) nothing is re-bound and the
  new fd is closed; in another netns (the pod was recreated under the same uid) the old proxy
  is torn down first.  An add whose listeners cannot be opened is NACKed with the reason and
  kept *pending*: it is retried every ``retry_interval`` seconds until it works or is deleted.
- Keep (snapshot only): the pod stays served although the agent had no fd for it.
- SnapshotSent: every served or pending pod the snapshot did not name is removed.  The first
  time a snapshot has arrived and no pod is pending, ``on_ready`` is called (the readiness task
  "workload proxy manager"); it is never taken back.
- Del: the pod's proxy stops at once, without drain (its network is already gone).

Invariants:
- The data path never depends on the agent: when the connection drops, ztunnel keeps serving
  every pod and reconnects with capped, jittered exponential backoff; the next snapshot then
  reconciles.
- Every received fd is owned by exactly one holder: decoding errors close it at once; a
  served pod's fd is owned by its :class:`~ztunnel.proxy.PodProxy` (closed when it stops); a
  pending pod's fd is owned here until it is started, replaced or deleted.
- A malformed datagram or an out-of-order message is NACKed and the connection dropped (then
  re-established), as the agent's view and ours can no longer be trusted to agree.

I/O choice: ``loop.sock_recv`` cannot return ancillary data, so receiving uses a non-blocking
``recvmsg`` woken by ``loop.add_reader`` (:func:`ambient.zds.recv_datagram`) on the event
loop itself; a thread would need handing every fd and message back to the loop anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ambient import zds
from ztunnel.proxy import Ztunnel

log = logging.getLogger("ztunnel.inpod")

RETRY_PENDING_S = 5.0
BACKOFF_INITIAL_S = 0.01
BACKOFF_CAP_S = 15.0
BACKOFF_JITTER = 0.2


@dataclass
class _Known:
    """A pod the agent told us about: served (fd owned by the PodProxy) or pending (fd here)."""

    info: zds.WorkloadInfo
    netns: zds.NetnsId
    pending_fd: int | None = None  # set while the pod's listeners could not be opened
    error: str = ""


class WorkloadProxyManager:
    """Keeps a connection to the node agent and applies its pods to a :class:`Ztunnel`."""

    def __init__(
        self,
        zt: Ztunnel,
        path: str,
        *,
        on_ready: Callable[[], None] | None = None,
        retry_interval: float = RETRY_PENDING_S,
        backoff_initial: float = BACKOFF_INITIAL_S,
        backoff_cap: float = BACKOFF_CAP_S,
    ) -> None:
        self.zt = zt
        self.path = path
        self.on_ready = on_ready
        self.retry_interval = retry_interval
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.known: dict[str, _Known] = {}
        self.ready = False
        self.snapshot_received = False
        self.connected = False
        self.connections = 0  # successful connects so far (for operators and tests)
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None

    # -- state for the admin dump ---------------------------------------------------------

    def workload_state(self) -> dict[str, Any]:
        """``workloadState`` of config_dump: per pod uid, its info and ``Up``/``Pending``."""
        out: dict[str, Any] = {}
        for uid, k in self.known.items():
            up = k.pending_fd is None and uid in self.zt.pods
            entry: dict[str, Any] = {
                "info": {"name": k.info.name, "namespace": k.info.namespace,
                         "serviceAccount": k.info.service_account},
                "state": "Up" if up else "Pending",
            }
            if k.error and not up:
                entry["error"] = k.error
            out[uid] = entry
        return out

    @property
    def pending(self) -> list[str]:
        return sorted(uid for uid, k in self.known.items() if k.pending_fd is not None)

    # -- connection loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve the session, reconnect on loss; forever (cancel to stop)."""
        delays = zds.backoff_delays(self.backoff_initial, self.backoff_cap)
        try:
            while True:
                sock = await self._connect()
                if sock is None:
                    delay = zds.jittered(next(delays), BACKOFF_JITTER, random.random())
                    await asyncio.sleep(delay)
                    continue
                self.connections += 1
                self.connected = True
                session = zds.ZtunnelSession()
                try:
                    await self._session(sock, session)
                except (OSError, zds.ZdsProtocolError) as e:
                    log.warning("connection to the node agent at %s ended: %s; pods stay "
                                "served, reconnecting", self.path, e)
                except Exception:  # a bug here must not stop ztunnel from reconnecting
                    log.exception("ZDS session with %s failed; pods stay served, reconnecting",
                                  self.path)
                finally:
                    self.connected = False
                    sock.close()
                if session.phase is zds.Phase.READY:  # a healthy session: start backoff over
                    delays = zds.backoff_delays(self.backoff_initial, self.backoff_cap)
                await asyncio.sleep(zds.jittered(next(delays), BACKOFF_JITTER, random.random()))
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop retrying pending pods and close their fds (served pods are the proxy's)."""
        if self._retry_task is not None:
            self._retry_task.cancel()
            await asyncio.gather(self._retry_task, return_exceptions=True)
            self._retry_task = None
        for k in self.known.values():
            if k.pending_fd is not None:
                zds.close_fds([k.pending_fd])
                k.pending_fd = None

    async def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
        except OSError as e:
            sock.close()
            log.warning("cannot connect to the CNI node agent at %s (%s); is the istio-cni "
                        "node agent running on this node and is its socket mounted "
                        "(INPOD_UDS)? retrying", self.path, e.strerror or e)
            return None
        log.info("connected to the CNI node agent at %s", self.path)
        return sock

    async def _session(self, sock: socket.socket, session: zds.ZtunnelSession) -> None:
        await zds.send_datagram(sock, zds.encode_hello())
        session.hello_sent()
        while True:
            data, fds, flags = await zds.recv_datagram(sock)
            if not data and not fds:
                log.info("the node agent closed the connection")
                return
            try:
                received = zds.decode_request(data, fds, flags)
                keep = session.receive(received.request)
            except zds.ZdsProtocolError as e:
                zds.close_fds(fds)
                await zds.send_datagram(sock, zds.encode_ack(f"protocol error: {e}"))
                raise
            error = await self._apply(received, keep)
            await zds.send_datagram(sock, zds.encode_ack(error))

    # -- applying requests ----------------------------------------------------------------

    async def _apply(self, received: zds.Received, keep: set[str] | None) -> str:
        """Apply one request; returns "" or the reason it failed (the NACK text)."""
        req = received.request
        async with self._lock:
            if isinstance(req, zds.Add):
                assert received.fd is not None and req.info is not None
                error = await self._add(req.uid, req.info, received.fd)
            elif isinstance(req, zds.Del):
                await self._forget(req.uid)
                error = ""
            elif isinstance(req, zds.Keep):
                if req.uid not in self.known and req.uid not in self.zt.pods:
                    log.info("keep for pod %s, which this ztunnel does not serve", req.uid)
                error = ""
            else:
                assert keep is not None
                stale = (set(self.known) | set(self.zt.pods)) - keep
                for uid in stale:
                    log.info("pod %s was not in the node agent's snapshot; removing it", uid)
                    await self._forget(uid)
                self.snapshot_received = True
                error = ""
            self._check_ready()
        return error

    def _check_ready(self) -> None:
        if self.snapshot_received and not self.pending and not self.ready:
            self.ready = True
            log.info("workload proxy manager ready: %d pods served", len(self.zt.pods))
            if self.on_ready is not None:
                self.on_ready()

    async def _add(self, uid: str, info: zds.WorkloadInfo, fd: int) -> str:
        try:
            new_id = zds.netns_id(fd)
        except OSError as e:
            zds.close_fds([fd])
            return f"the netns fd for pod {info.namespace}/{info.name} is unusable: {e}"
        known = self.known.get(uid)
        served = known.netns if known is not None and uid in self.zt.pods else None
        if zds.add_action(served, new_id) is zds.AddAction.KEEP:
            assert known is not None
            known.info = info
            zds.close_fds([fd])
            log.info("pod %s/%s (uid %s) is already served in this netns", info.namespace,
                     info.name, uid)
            return ""
        await self._forget(uid)
        self.known[uid] = _Known(info, new_id, pending_fd=fd)
        return await self._start(uid)

    async def _start(self, uid: str) -> str:
        """Try to serve a pending pod; on failure it stays pending and a retry is scheduled."""
        k = self.known[uid]
        assert k.pending_fd is not None
        try:
            dup = os.dup(k.pending_fd)
            await self.zt.add_pod(uid, k.info.name, k.info.namespace, dup, own_netns=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported to the agent
            k.error = f"cannot start the proxy for pod {k.info.namespace}/{k.info.name}: {e}"
            log.error("%s; will retry every %.0fs", k.error, self.retry_interval)
            self._schedule_retry()
            return k.error
        zds.close_fds([k.pending_fd])
        k.pending_fd = None
        k.error = ""
        return ""

    async def _forget(self, uid: str) -> None:
        k = self.known.pop(uid, None)
        if k is not None and k.pending_fd is not None:
            zds.close_fds([k.pending_fd])
        await self.zt.del_pod(uid)

    def _schedule_retry(self) -> None:
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_pending())

    async def _retry_pending(self) -> None:
        while self.pending:
            await asyncio.sleep(self.retry_interval)
            async with self._lock:
                for uid in self.pending:
                    log.info("retrying pod %s", uid)
                    await self._start(uid)
                self._check_ready()
