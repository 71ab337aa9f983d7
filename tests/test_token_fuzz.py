"""Fuzzing causal tokens: whatever a cookie or header holds, nothing raises.

Every field of a token is untrusted. The bulk (thousands of cases) runs
through everything that reads a token without a server: ``decode``,
``verify`` and each backend's position parser, and ``causal_context`` itself.
A sample runs through ``causal_context(token=...)`` and a routed read on the
real PostgreSQL and MariaDB topologies, with tokens signed with the router's
own secret, name, kind and lineage, so hostile positions reach the replicas'
waits. Hypothesis runs derandomized (the same cases every run) and keeps no
example database in the working tree.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import causal
from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.positions import PositionBackend
from sqlalchemy_replicas.positions.mariadb import MariaDBPositions
from sqlalchemy_replicas.positions.mysql import MySQLPositions
from sqlalchemy_replicas.positions.postgresql import PostgresPositions
from sqlalchemy_replicas.testing import Topology
from sqlalchemy_replicas.token import TokenEntry, TokenError

SECRET = "fuzz-secret"
NAME = "default"
BULK = settings(
    max_examples=1500,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
SERVED = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PARSERS: tuple[PositionBackend, ...] = (PostgresPositions(), MariaDBPositions(), MySQLPositions())

# -- strategies -------------------------------------------------------------------

huge_ints = st.sampled_from(
    [10**400, -(10**400), 10**308 * 10, 2**63, 2**64, 2**64 - 1, 2**32, -1, 0, 10**19, 10**11 + 1]
)
hostile_ints = huge_ints | st.integers()
hostile_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 1e11 + 1]
)
hostile_text = st.text(max_size=40) | st.sampled_from(
    [
        "",
        "\x00",
        "\udcff",
        "é",
        "\u202e",
        "٣",
        "\U0001d7d8/\U0001d7d9",
        "NaN",
        "null",
        "[]",
        "{}",
        " " * 50,
    ]
)
scalars = st.none() | st.booleans() | hostile_ints | hostile_floats | hostile_text
nested = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
# Position texts that look right to each parser, but with hostile digits or
# values out of range, next to plain garbage.
hostile_positions = (
    hostile_text
    | st.from_regex(r"[0-9A-Fa-f]{1,10}/[0-9A-Fa-f]{1,10}", fullmatch=True)
    | st.from_regex(r"\d{1,22}-\d{1,11}-\d{1,22}(,\d{1,22}-\d{1,3}-\d{1,22}){0,3}", fullmatch=True)
    | st.from_regex(
        r"[0-9a-fA-F]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(:\d{1,21}(-\d{1,21})?){1,3}",
        fullmatch=True,
    )
    | st.sampled_from(
        [
            "FFFFFFFF/FFFFFFFF",
            "0/0",
            "0/1\n",
            " 0/1 ",
            "4294967295-4294967295-18446744073709551615",
            "4294967296-0-1",
            "0-0-18446744073709551616",
            "0-0-1," * 300,
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-9223372036854775807",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-9223372036854775808",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:5-1",
            tokens.UNKNOWN_POSITION,
        ]
    )
)
# Positions each parser accepts, up to the edges of their ranges: they pass
# every check and reach the replicas' waits (far ahead of the primary, or behind it).
IN_RANGE = {
    "pg": st.integers(0, 2**64 - 1).map(lambda lsn: f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}")
    | st.sampled_from(["0/0", "FFFFFFFF/FFFFFFFF"]),
    "mariadb": st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
        min_size=1,
        max_size=4,
    ).map(lambda gtids: ",".join(f"{d}-{s}-{q}" for d, s, q in gtids))
    | st.sampled_from(["0-0-0", "4294967295-4294967295-18446744073709551615"]),
}
hostile_times = hostile_ints | hostile_floats


def b64(raw: bytes) -> str:
    """base64url without padding, as tokens are written."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def body_token(entries: dict[str, Any], version: Any = 1) -> str:
    """A token from a JSON body (JSON allows NaN and Infinity, as attackers may)."""
    return b64(json.dumps({"v": version, "e": entries}).encode())


@dataclass(frozen=True)
class Genuine:
    """What a router's genuine token entry holds."""

    name: str
    kind: str
    lineage: str
    position: str


PG = Genuine(NAME, "pg", "pg:7301", "16/B374D848")


@st.composite
def signed_hostile(draw: st.DrawFn, genuine: Genuine, secret: str = SECRET) -> str:
    """A token signed with the router's own secret and name, so it passes the
    signature check and its position reaches the parser (and on a real topology
    the replicas' waits), with any field hostile."""
    now = time.time()
    kind = draw(st.just(genuine.kind) | hostile_text)
    lineage = draw(st.just(genuine.lineage) | hostile_text)
    position = draw(st.just(genuine.position) | hostile_positions)
    issued_at = draw(st.sampled_from([now, now - 1.5]) | hostile_times)
    entry = tokens.sign(secret, genuine.name, kind, lineage, position, issued_at)
    entries = {
        genuine.name: [entry.kind, entry.lineage, entry.position, issued_at, entry.signature]
    }
    return body_token(entries)


@st.composite
def signed_positions(draw: st.DrawFn, genuine: Genuine) -> str:
    """A token that passes every check but the position's: signed with the router's
    secret, name, kind and lineage, issued now, around a hostile position."""
    in_range = draw(st.integers(0, 3)) > 0  # mostly positions the parser accepts
    position = draw(IN_RANGE[genuine.kind] if in_range else hostile_positions)
    entry = tokens.sign(SECRET, genuine.name, genuine.kind, genuine.lineage, position, time.time())
    return tokens.encode({genuine.name: entry})


@st.composite
def unsigned_hostile(draw: st.DrawFn, genuine: Genuine) -> str:
    """A structurally valid token whose fields (and the entry itself) hold anything."""
    entry: Any = [
        draw(st.just(genuine.kind) | nested),
        draw(st.just(genuine.lineage) | nested),
        draw(hostile_positions | nested),
        draw(hostile_times | nested),
        draw(st.just("A" * 43) | nested),
    ]
    if draw(st.booleans()):
        entry = draw(nested | st.lists(nested, min_size=4, max_size=6))
    name = draw(st.just(genuine.name) | hostile_text)
    version = draw(st.just(1) | scalars)
    return body_token({name: entry}, version)


@st.composite
def mutated(draw: st.DrawFn, original: str) -> str:
    """``original`` with characters replaced, inserted or deleted."""
    chars = list(original)
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, max(0, len(chars) - 1)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.characters(codec="utf-8") | st.sampled_from(list("AZaz09-_=+/.")))
        if action == "replace" and chars:
            chars[where] = char
        elif action == "insert":
            chars.insert(where, char)
        elif chars:
            del chars[where]
    return "".join(chars)


def random_bytes() -> st.SearchStrategy[str]:
    """Base64 of random bytes, and random text."""
    return st.binary(max_size=300).map(b64) | st.text(max_size=300)


def genuine_token(genuine: Genuine) -> str:
    """A genuine token of ``genuine``, signed now."""
    entry = tokens.sign(
        SECRET, genuine.name, genuine.kind, genuine.lineage, genuine.position, time.time()
    )
    return tokens.encode({genuine.name: entry})


def any_token(genuine: Genuine, real: str) -> st.SearchStrategy[str]:
    """Every kind of hostile token, built around one router's genuine entry."""
    return (
        random_bytes()
        | mutated(real)
        | signed_hostile(genuine)
        | unsigned_hostile(genuine)
        | st.sampled_from(
            [
                body_token({genuine.name: ["pg", "l", "0/1", 10**400, "A" * 43]}),
                "",
                "=" * 10,
                "A" * (tokens.MAX_TOKEN_LENGTH + 1),
            ]
        )
    )


# -- pure: decode, verify, parse ---------------------------------------------------


def consume(token: str) -> str:
    """Run ``token`` through everything that reads a token without a server, as
    a router does; return ``accepted`` or the reason it was refused. Anything
    else raised fails the test."""
    with sr.causal_context(token):
        pass
    try:
        entries = tokens.decode(token)
    except TokenError as error:
        event(f"outcome: {error.reason}")
        return error.reason
    tokens.encode(entries)  # forwarded unchanged to the next request
    outcome = "empty"
    for name, entry in entries.items():
        try:
            tokens.verify(SECRET, name, entry, now=time.time(), max_age=3600)
        except TokenError as error:
            outcome = error.reason
            continue
        # Verified: every field is sane.
        assert isinstance(entry.issued_at, float)
        assert math.isfinite(entry.issued_at)
        assert entry.kind.isascii()
        outcome = "accepted"
        for parser in PARSERS:
            try:
                parsed = parser.parse(entry.position)
            except ValueError:
                continue
            assert parser.parse(parser.format(parsed)) == parsed
    event(f"outcome: {outcome}")
    return outcome


@BULK
@given(token=random_bytes())
def test_random_bytes_are_refused_without_raising(token: str) -> None:
    """Random bytes and text: decode and causal_context raise nothing but TokenError
    (and causal_context not even that)."""
    assert consume(token) in {"malformed", "oversized", "bad_signature", "empty", "accepted"}


@BULK
@given(token=mutated(genuine_token(PG)))
def test_mutated_genuine_tokens_never_raise(token: str) -> None:
    """A genuine token with characters replaced, inserted or deleted is refused as
    malformed or badly signed, or (a harmless mutation) still accepted."""
    assert consume(token) in {"malformed", "bad_signature", "accepted", "expired"}


@BULK
@given(token=unsigned_hostile(PG))
def test_structurally_valid_hostile_fields_never_raise(token: str) -> None:
    """Huge ints, NaN and infinities, negatives, unicode, wrong types and nested
    structures in any field of an unsigned token: refused, never raised."""
    assert consume(token) in {"malformed", "oversized", "bad_signature", "empty"}


@BULK
@given(token=signed_hostile(PG))
def test_correctly_signed_hostile_fields_never_raise(token: str) -> None:
    """The same hostile values signed with the router's secret pass the signature
    check where well-typed, then are refused by range (``malformed``, ``expired``,
    ``from_the_future``) or reach the position parsers, which raise only ValueError.
    (An int issued-at is signed as an int but read back as a float: ``bad_signature``.)"""
    assert consume(token) in {
        "malformed",
        "bad_signature",
        "oversized",
        "expired",
        "from_the_future",
        "accepted",
    }


@BULK
@given(
    kind=hostile_text | nested,
    lineage=hostile_text | nested,
    position=hostile_positions | nested,
    issued_at=hostile_times | nested,
    signature=hostile_text | nested,
)
def test_verify_refuses_hostile_entries_built_in_code(
    kind: Any, lineage: Any, position: Any, issued_at: Any, signature: Any
) -> None:
    """verify() on an entry of any field values (not only decoded ones) raises
    TokenError, never TypeError or OverflowError (compare_digest refuses non-ASCII
    str; float() overflows)."""
    entry = TokenEntry(kind, lineage, position, issued_at, signature)
    with pytest.raises(TokenError):
        tokens.verify(SECRET, NAME, entry, now=time.time(), max_age=3600)


def test_the_reported_overflow_is_refused_as_malformed() -> None:
    """The token from the report (issued-at 10**400, unsigned) is malformed, and so
    are NaN, infinite, negative and far-future issued-at times, signed or not."""
    for issued_at in (10**400, math.nan, math.inf, -math.inf, -1.0, 1e12):
        unsigned = body_token({NAME: ["pg", "l", "0/1", issued_at, "A" * 43]})
        with pytest.raises(TokenError) as caught:
            tokens.decode(unsigned)
        assert caught.value.reason == "malformed", issued_at
        entry = tokens.sign(SECRET, NAME, "pg", "l", "0/1", issued_at)
        signed = body_token({NAME: ["pg", "l", "0/1", issued_at, entry.signature]})
        with pytest.raises(TokenError) as caught:
            tokens.decode(signed)
        assert caught.value.reason == "malformed", issued_at


# -- on real servers: causal_context and a routed read ------------------------------


class Base(DeclarativeBase):
    pass


class FuzzItem(Base):
    __tablename__ = "fuzz_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(sa.String(20))


@dataclass(frozen=True)
class Served:
    """A router over a real topology, its genuine token entry and a genuine token."""

    router: sr.ReplicaRouter
    genuine: Genuine
    token: str


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("postgres", marks=pytest.mark.postgresql, id="postgresql"),
        pytest.param("mariadb", marks=pytest.mark.mariadb, id="mariadb"),
    ],
)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A router with the router's secret over a reset topology, one row committed and
    replicated, and the genuine token of that commit."""
    topology: Topology = request.getfixturevalue(f"{request.param}_topology")
    topology.reset()
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, secret=SECRET, wait_timeout=0.05
    )
    Base.metadata.create_all(router.primary)
    with sr.causal_context() as ctx, router.sessionmaker()() as session:
        session.add(FuzzItem(id=1, note="x"))
        session.commit()
        token = ctx.token
    assert token is not None
    topology.wait_for_catchup()
    entry = tokens.decode(token)[router.name]
    yield Served(router, Genuine(router.name, entry.kind, entry.lineage, entry.position), token)
    router.dispose()


@SERVED
@given(data=st.data())
def test_hostile_tokens_never_raise_into_a_routed_read(served: Served, data: st.DataObject) -> None:
    """causal_context(token=...) with any hostile token (random, mutated, unsigned or
    signed with the router's secret, name, kind and lineage around hostile positions)
    and a routed read in it: the read returns the committed row, a token refused on
    decoding is counted under its reason, and the token the block hands on is either
    absent or verifies for this router."""
    router = served.router
    # Half of the cases pass every check but the position's, to reach the waits.
    if data.draw(st.booleans(), label="signed around a hostile position"):
        token = data.draw(signed_positions(served.genuine), label="token")
    else:
        token = data.draw(any_token(served.genuine, served.token), label="token")
    try:
        tokens.decode(token)
        refused = None
    except TokenError as error:
        refused = error.reason
    before = causal.rejected_tokens.copy()
    with sr.causal_context(token) as ctx, router.sessionmaker()() as session:
        assert session.scalar(sa.select(FuzzItem.note).where(FuzzItem.id == 1)) == "x"
        handed_on = ctx.token
    if refused is not None and token:
        assert causal.rejected_tokens[refused] == before[refused] + 1
    counted = sorted((causal.rejected_tokens - before).elements())
    event(f"refused: {', '.join(counted)}" if counted else "not refused")
    # Forwarded entries of other routers may make it too long; otherwise it is
    # well formed and this router's entry, if any, verifies.
    if handed_on is not None and len(handed_on) <= tokens.MAX_TOKEN_LENGTH:
        mine = tokens.decode(handed_on).get(router.name)
        if mine is not None:
            tokens.verify(SECRET, router.name, mine, now=time.time(), max_age=router.token_max_age)
