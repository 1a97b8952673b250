"""Each replica's private address, as a small file under `<data_dir>/replicas/`: the data dir is the
store every replica shares already, so the front end finds every replica there (for /ready, /metrics
and /cluster/replicas) without a service of its own."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def _root(data_dir: Path) -> Path:
    return data_dir / "replicas"


def register(data_dir: Path, replica: str, address: str) -> None:
    root = _root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = {"replica": replica, "address": address, "host": socket.gethostname(), "pid": os.getpid()}
    tmp = root / f".{replica}.tmp"
    tmp.write_text(json.dumps(entry))
    tmp.replace(root / f"{replica}.json")


def unregister(data_dir: Path, replica: str) -> None:
    (_root(data_dir) / f"{replica}.json").unlink(missing_ok=True)


def registered(data_dir: Path) -> list[dict[str, Any]]:
    """Every replica registered, less those of this host whose process is gone (their files removed)."""
    found = []
    for path in sorted(_root(data_dir).glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("host") == socket.gethostname() and not _alive(int(entry.get("pid", 0))):
            path.unlink(missing_ok=True)
            continue
        found.append(entry)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
