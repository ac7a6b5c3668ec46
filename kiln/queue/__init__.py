"""The job queue: a state machine per job and a broker that orders, hands out and records jobs."""

from kiln.queue.base import Broker
from kiln.queue.job import TERMINAL, InvalidTransition, Job, JobStatus, Priority
from kiln.queue.local import SqliteBroker

__all__ = [
    "TERMINAL",
    "Broker",
    "InvalidTransition",
    "Job",
    "JobStatus",
    "Priority",
    "SqliteBroker",
]
