"""Published adapter versions on disk: PEFT directories (safetensors + config) plus a meta.json.

A version is written to a staging directory and renamed into place, so a crash never leaves half a
version; the active version is a small file replaced atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    created_at: float
    serving_loss: float | None  # held-out loss of the version it replaced, at publish time
    learner_loss: float | None  # held-out loss of this version at publish time
    num_optimizer_steps: int
    reason: str


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[AdapterVersion]:
        found = []
        for meta in self.root.glob("v*/meta.json"):
            found.append(AdapterVersion(**json.loads(meta.read_text())))
        return sorted(found, key=lambda v: v.version)

    def next_version(self) -> int:
        return max((v.version for v in self.versions()), default=0) + 1

    def write(self, meta: AdapterVersion, save: Callable[[str], None]) -> Path:
        """`save(dir)` writes the PEFT adapter into dir/v<N>/ (peft's layout for named adapters)."""
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            save(str(staging))
            written = staging / f"v{meta.version}"
            (written / "meta.json").write_text(json.dumps(asdict(meta)))
            os.rename(written, self.path(meta.version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.path(meta.version)

    def active(self) -> int:
        marker = self.root / "ACTIVE"
        return int(marker.read_text()) if marker.is_file() else 0

    def set_active(self, version: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".active-")
        with os.fdopen(fd, "w") as handle:
            handle.write(str(version))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / "ACTIVE")

    def exists(self, version: int) -> bool:
        return version == 0 or (self.path(version) / "meta.json").is_file()

    @staticmethod
    def now() -> float:
        return time.time()
