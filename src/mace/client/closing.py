"""`async with` for anything with an async `close()`: the clients and sessions of the SDK share it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncClosing:
    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
