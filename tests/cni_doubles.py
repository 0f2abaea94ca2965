"""Recording doubles of the node agent's capture backend and ZDS server.

They let tests check the agent's decisions and their order; what the real backends do to
the kernel and what ZDS does to ztunnel is tested against the real parts in tests/netns.
"""

from __future__ import annotations

from typing import ClassVar

from cni.capture.base import CaptureError, PodCapture
from cni.zds import ZdsPod


class RecordingBackend:
    name: ClassVar[str] = "recording"

    def __init__(self) -> None:
        self.applied: dict[str, PodCapture] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_apply = False
        self.drift: list[str] = []

    def unavailable_reason(self) -> str | None:
        return None

    def setup_node(self) -> None:
        pass

    def teardown_node(self) -> list[str]:
        return []

    def apply(self, pod: PodCapture) -> None:
        self.calls.append(("apply", pod.name))
        if self.fail_apply:
            raise CaptureError("iptables-restore failed")
        self.applied[pod.uid] = pod

    def remove(self, pod: PodCapture) -> list[str]:
        self.calls.append(("remove", pod.name))
        self.applied.pop(pod.uid, None)
        return []

    def check(self, pod: PodCapture) -> list[str]:
        return list(self.drift)


class RecordingZds:
    def __init__(self) -> None:
        self.served: dict[str, ZdsPod] = {}
        self.calls: list[tuple[str, str]] = []
        self.down = False

    async def add(self, pod: ZdsPod) -> None:
        self.calls.append(("add", pod.name))
        if self.down:
            raise RuntimeError("no ztunnel is connected on this node")
        self.served[pod.uid] = pod

    async def delete(self, uid: str) -> list[str]:
        self.calls.append(("del", uid))
        self.served.pop(uid, None)
        return []
