"""The worker: owns the engine, runs sync requests and queued jobs, stores their outputs."""

from kiln.worker.payload import from_payload, to_payload
from kiln.worker.runner import Stored, SyncTicket, Worker, capacity_exhausted

__all__ = ["Stored", "SyncTicket", "capacity_exhausted", "Worker", "from_payload", "to_payload"]
