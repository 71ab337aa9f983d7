"""MariaDB/MySQL: what a replica says it replicates from.

Both report their replication sources (one row per channel or connection)
in a ``SHOW ... STATUS`` statement that needs a monitoring privilege; an
application user without it gets error 1227, which becomes the reason the
server cannot be trusted, naming the grant that fixes it.
"""

from __future__ import annotations

import socket
from typing import Any, Final

from ._base import SQLRunner

__all__ = ["addresses", "source_rows"]

#: ER_SPECIFIC_ACCESS_DENIED_ERROR: "you need (at least one of) the ... privilege(s)".
_ACCESS_DENIED: Final = 1227


def source_rows(replica: SQLRunner, statement: str, grant: str) -> list[dict[str, Any]] | str:
    """The rows of ``statement`` (``SHOW ALL SLAVES STATUS``, ``SHOW REPLICA
    STATUS``) on ``replica`` as mappings, or, when the user may not run it,
    a reason naming ``grant``. Other errors (a lost connection) propagate."""
    try:
        return [dict(row) for row in replica.exec_driver_sql(statement).mappings().all()]
    except Exception as error:
        if _error_code(error) != _ACCESS_DENIED:
            raise
        return (
            "its replication source cannot be read with this user's privileges, so it "
            f"cannot be shown to replicate from the primary: {grant}"
        )


def addresses(host: str | None) -> frozenset[str]:
    """``host`` and the IP addresses it resolves to (none when it does not)."""
    if not host:
        return frozenset()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset({host})
    return frozenset({host, *(str(info[4][0]) for info in infos)})


def _error_code(error: BaseException) -> int | None:
    """The MySQL error number of a driver error, raw or wrapped by SQLAlchemy."""
    orig = getattr(error, "orig", None) or error
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
