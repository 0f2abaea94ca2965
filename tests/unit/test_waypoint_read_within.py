"""``waypoint.h1._read_within``: a read bounded in time, with ``asyncio.timeout``'s rules."""

from __future__ import annotations

import asyncio

import pytest

from waypoint.h1 import _read_within


class _Stream:
    def __init__(self) -> None:
        self.data: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def read(self) -> bytes:
        return await self.data

    async def write(self, data: bytes) -> None:  # pragma: no cover - not used
        pass

    def write_eof(self) -> None:  # pragma: no cover
        pass

    def abort(self) -> None:  # pragma: no cover
        pass


def test_data_before_the_deadline_is_returned() -> None:
    async def main() -> None:
        s = _Stream()
        asyncio.get_running_loop().call_soon(s.data.set_result, b"abc")
        assert await _read_within(s, 30) == b"abc"

    asyncio.run(main())


def test_deadline_raises_timeout_and_leaves_the_task_uncancelled() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            await _read_within(_Stream(), 0.01)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0)  # still runnable: nothing left pending a cancel

    asyncio.run(main())


def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def main() -> None:
        t = asyncio.ensure_future(_read_within(_Stream(), 30))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
