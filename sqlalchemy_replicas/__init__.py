"""sqlalchemy-replicas: safe read replicas for SQLAlchemy.

A :class:`RoutingSession` picks a bind per statement: writes and anything
that might write or lock go to the primary, provable reads to replicas.
"""

from __future__ import annotations

from . import exc
from .classify import Classification, StatementKind, classify
from .consistency import LEVELS, ConsistencyLevel
from .router import EngineSource, ReplicaRouter
from .session import RoutingSession

__all__ = [
    "LEVELS",
    "Classification",
    "ConsistencyLevel",
    "EngineSource",
    "ReplicaRouter",
    "RoutingSession",
    "StatementKind",
    "classify",
    "exc",
]

__version__ = "0.1.0.dev0"
