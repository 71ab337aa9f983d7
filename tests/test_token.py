"""Causal tokens: signed, verified, and harmless when forged or broken."""

from __future__ import annotations

import base64
import dataclasses
import json
import random

import pytest

from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.token import MAX_TOKEN_LENGTH, TokenEntry, TokenError

NOW = 1_800_000_000.0


def signed(secret: str = "s3cret", issued_at: float = NOW) -> dict[str, TokenEntry]:
    return {
        "main": tokens.sign(secret, "main", "pg", "pg:7301", "16/B374D848", issued_at),
        "billing": tokens.sign(
            "other", "billing", "mariadb", "mariadb:h:3306:1", "0-0-10", issued_at
        ),
    }


def test_round_trip_is_url_safe_and_verifies() -> None:
    """Encoded entries decode to the same entries, and each verifies with its secret."""
    token = tokens.encode(signed())
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    entries = tokens.decode(token)
    assert entries == signed()
    tokens.verify("s3cret", "main", entries["main"], now=NOW + 1, max_age=60)
    tokens.verify("other", "billing", entries["billing"], now=NOW + 1, max_age=60)


@pytest.mark.parametrize(
    ("secret", "name", "change", "reason"),
    [
        ("wrong", "main", {}, "bad_signature"),
        ("s3cret", "billing", {}, "bad_signature"),
        ("s3cret", "main", {"position": "FF/0"}, "bad_signature"),
        ("s3cret", "main", {"kind": "mariadb"}, "bad_signature"),
        ("s3cret", "main", {"lineage": "pg:9999"}, "bad_signature"),
        ("s3cret", "main", {"issued_at": NOW + 1}, "bad_signature"),
    ],
)
def test_tampering_is_detected(
    secret: str, name: str, change: dict[str, object], reason: str
) -> None:
    """Another secret, another router's name, or any changed field fails verification."""
    entry = signed()["main"]
    forged = dataclasses.replace(entry, **change)  # type: ignore[arg-type]
    with pytest.raises(TokenError) as caught:
        tokens.verify(secret, name, forged, now=NOW, max_age=60)
    assert caught.value.reason == reason


def test_age_limits() -> None:
    """Old tokens expire; tokens from far in the future are refused."""
    entry = signed()["main"]
    with pytest.raises(TokenError, match="expired"):
        tokens.verify("s3cret", "main", entry, now=NOW + 61, max_age=60)
    with pytest.raises(TokenError, match="from_the_future"):
        tokens.verify("s3cret", "main", entry, now=NOW - 3600, max_age=60)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not base64 !!",
        b64(b"not json"),
        b64(b"[1, 2]"),
        b64(json.dumps({"v": 2, "e": {}}).encode()),
        b64(json.dumps({"v": 1, "e": []}).encode()),
        b64(json.dumps({"v": 1, "e": {"x": ["pg", "l", "0/1", "now", "sig"]}}).encode()),
        b64(json.dumps({"v": 1, "e": {"x": ["pg", "l", "0/1", True, "sig"]}}).encode()),
        b64(json.dumps({"v": 1, "e": {"x": ["pg", "l", "0/1", 1.0]}}).encode()),
        b64(json.dumps({"v": 1, "e": {"x": ["pg", 7, "0/1", 1.0, "sig"]}}).encode()),
        b64(b"[" * 3000),
        b64("\udcff".encode("utf-8", "surrogatepass")),
    ],
)
def test_malformed_tokens_raise_only_token_error(token: str) -> None:
    """Garbage gives TokenError('malformed'), never another exception."""
    with pytest.raises(TokenError) as caught:
        tokens.decode(token)
    assert caught.value.reason == "malformed"


def test_oversized_tokens_are_refused_unread() -> None:
    """A token longer than the limit is refused before decoding."""
    with pytest.raises(TokenError, match="oversized"):
        tokens.decode("A" * (MAX_TOKEN_LENGTH + 1))


def test_random_bytes_never_escape_as_other_errors() -> None:
    """Fuzz: random strings and mutations of a real token either raise TokenError or
    decode to entries that are unchanged or fail verification."""
    rng = random.Random(1234)
    originals = signed()
    secrets = {"main": "s3cret", "billing": "other"}
    real = tokens.encode(originals)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.~!"
    for _ in range(3000):
        if rng.random() < 0.5:
            candidate = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        else:
            chars = list(real)
            for _ in range(rng.randint(1, 4)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            candidate = "".join(chars)
        try:
            entries = tokens.decode(candidate)
        except TokenError:
            continue
        for name, entry in entries.items():
            if entry == originals.get(name):
                continue  # the mutation hit nothing that matters
            with pytest.raises(TokenError):
                tokens.verify(secrets.get(name, "s3cret"), name, entry, now=NOW, max_age=60)
