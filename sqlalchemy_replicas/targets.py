"""The servers a router routes between, as values (no I/O).

A module of its own so that everything that needs to name a server (the
shared state in :mod:`~sqlalchemy_replicas.cluster`, the session, the lag
monitor, connection guards) can do so without importing the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from sqlalchemy.engine import URL, Engine

if TYPE_CHECKING:
    # Annotations only: importing the asyncio extension needs greenlet (see _asyncio).
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["EngineSource", "RoutedEngine"]

EngineSource: TypeAlias = "str | URL | Engine | AsyncEngine"
"""What a primary or a replica may be given as: a URL string, a URL, or an engine."""


@dataclass(frozen=True, slots=True)
class RoutedEngine:
    """One database server as the router sees it.

    :ivar name: ``"primary"`` or the replica's name, used in logs and status.
    :ivar engine: the engine the user gave or the router created (sync or async).
    :ivar sync_engine: the sync engine that sessions bind to.
    :ivar owned: True when the router created the engine and so disposes it.
    """

    name: str
    engine: Engine | AsyncEngine
    sync_engine: Engine
    owned: bool

    @property
    def is_async(self) -> bool:
        """True for an ``AsyncEngine`` (told apart without importing asyncio)."""
        return not isinstance(self.engine, Engine)

    @property
    def safe_url(self) -> str:
        """Its URL without the password."""
        return self.sync_engine.url.render_as_string(hide_password=True)
