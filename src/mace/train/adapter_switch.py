"""Which adapter the learner's LoRA layers apply, chosen per thread.

peft keeps that choice in two fields of every LoRA layer (`_disable_adapters`, `_active_adapter`),
which all threads share. On a CPU the engine runs a step's serving forward and its training stages
on two threads at once (engine/streams.py), each with its own adapter: the served versions on one,
the learner on the other. So the learner's layers read both fields through `_PerThread`: a thread
inside `choose(...)` sees its own choice, any other thread the shared value peft set.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()
_FIELDS = ("_disable_adapters", "_active_adapter")


class _PerThread:
    """A data descriptor in place of one of peft's two fields: it wins over the instance dict."""

    def __init__(self, position: int, field: str) -> None:
        self.position = position
        self.shared_key = f"_shared{field}"

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        choice = getattr(_local, "choice", None)
        if choice is not None:
            return choice[self.position]
        return layer.__dict__[self.shared_key]

    def __set__(self, layer: Any, value: Any) -> None:  # peft's own writes (set_adapter, enable_adapters)
        layer.__dict__[self.shared_key] = value


_switchable: dict[type, type] = {}


def make_switchable(layer: Any) -> None:
    """Give `layer` (a peft LoRA layer) per-thread adapter choice, keeping its current shared one."""
    cls = type(layer)
    if cls in _switchable.values():
        return
    if cls not in _switchable:
        fields = {field: _PerThread(position, field) for position, field in enumerate(_FIELDS)}
        _switchable[cls] = type(cls.__name__, (cls,), {**fields, "__module__": cls.__module__})
    current = {field: layer.__dict__.pop(field, getattr(cls, field)) for field in _FIELDS}
    layer.__class__ = _switchable[cls]
    for field, value in current.items():
        setattr(layer, field, value)


@contextmanager
def choose(disabled: bool, active: list[str]) -> Iterator[None]:
    """On this thread only, every switchable layer is `disabled` (base model alone) or applies `active`."""
    previous = getattr(_local, "choice", None)
    _local.choice = (disabled, active)
    try:
        yield
    finally:
        _local.choice = previous
