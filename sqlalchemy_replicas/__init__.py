"""sqlalchemy-replicas: safe read replicas for SQLAlchemy.

A :class:`RoutingSession` picks a bind per statement: writes and anything
that might write or lock go to the primary, provable reads to replicas that
have applied every commit of the causal scope (read-your-writes by
replication position).
"""

from __future__ import annotations

from . import exc
from .causal import CausalContext, causal_context
from .classify import Classification, Classifier, StatementKind, classify
from .consistency import LEVELS, ConsistencyLevel, consistency, default_consistency
from .explain import ExplainEntry, ExplainLog, ExplainRerun, ExplainWait, explain
from .monitor import ReplicaStatus
from .router import EngineSource, ReplicaRouter
from .rules import table_consistency
from .session import RoutingSession
from .stats import DecisionKey, ReasonCode, RouterStats, WaitStats
from .sticky import sticky

__all__ = [
    "LEVELS",
    "CausalContext",
    "Classification",
    "Classifier",
    "ConsistencyLevel",
    "DecisionKey",
    "EngineSource",
    "ExplainEntry",
    "ExplainLog",
    "ExplainRerun",
    "ExplainWait",
    "ReasonCode",
    "ReplicaRouter",
    "ReplicaStatus",
    "RouterStats",
    "RoutingSession",
    "StatementKind",
    "WaitStats",
    "causal_context",
    "classify",
    "consistency",
    "default_consistency",
    "exc",
    "explain",
    "sticky",
    "table_consistency",
]

__version__ = "0.1.0.dev0"
