"""The engine's public API: what the server (and other front ends) may import.

The server builds nothing from `mace.train` or `mace.model` itself; the composition root
(`server/runtime.py`) wires the model, the trainer and the journal into an `AsyncEngine`.
"""

from mace.engine.admission import Admission, Overloaded, RequestRejected, ShuttingDown
from mace.engine.frontend import AsyncEngine
from mace.engine.load import EngineLoad
from mace.engine.request import RequestOutput, SamplingParams
from mace.train.adapters import AdapterVersion
from mace.train.journal import Journal, NewSample
from mace.train.lease import OwnedElsewhere
from mace.train.publish_gate import AdapterCatalog
from mace.train.stats import TenantStats, TrainStats

__all__ = [
    "AdapterCatalog", "AdapterVersion", "Admission", "AsyncEngine", "EngineLoad", "Journal", "NewSample",
    "Overloaded", "OwnedElsewhere", "RequestOutput", "RequestRejected", "SamplingParams", "ShuttingDown",
    "TenantStats", "TrainStats",
]
