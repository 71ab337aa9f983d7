"""Per-request overhead of CausalMiddleware on a tiny FastAPI endpoint.

The same app (one async endpoint returning a short text, no database) is
called directly through ASGI, with no server and no HTTP client, so that the
middleware's own cost is not drowned in theirs:

- ``bare``: the app alone;
- ``middleware``: ``app.add_middleware(CausalMiddleware)`` with defaults, a
  request without a token;
- ``middleware, token cookie``: the same, the request carrying a token
  cookie among others (parsed and decoded; no router verifies it, as in a
  request that makes no query);
- ``middleware, sticky + method level``: also a sticky key from a header and
  ``method_consistency={"GET": "eventual"}``.

No request commits, so no token is signed: signing costs one HMAC per
router, on requests that wrote (and their commit costs far more). Rounds run
the variants in shuffled order; medians and their ratios to ``bare`` are
reported: on a shared machine only figures taken side by side mean anything.

    python benchmarks/asgi_overhead.py [--requests 5000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import fastapi
import starlette
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.integrations.asgi import CausalMiddleware, Scope

TOKEN = tokens.encode(
    {"default": tokens.sign("secret", "default", "pg", "lineage", "0/16B3740", time.time())}
)


def user(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"x-user":
            return str(value.decode())
    return None


def make_app(**middleware: Any) -> FastAPI:
    app = FastAPI()
    if middleware.pop("enabled", True):
        app.add_middleware(CausalMiddleware, **middleware)

    @app.get("/ping", response_class=PlainTextResponse)
    async def ping() -> str:
        return "pong"

    return app


def scope_for(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/ping",
        "raw_path": b"/ping",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }


async def measure(app: FastAPI, headers: list[tuple[bytes, bytes]], requests: int) -> float:
    """Microseconds of CPU per request for one round."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    started = time.process_time_ns()
    for _ in range(requests):
        await app(scope_for(headers), receive, send)
    return (time.process_time_ns() - started) / requests / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    plain = [(b"host", b"example.com"), (b"accept", b"*/*"), (b"x-user", b"42")]
    cookies = [*plain, (b"cookie", f"session=abc; theme=dark; db_causal={TOKEN}".encode())]
    variants: dict[str, tuple[FastAPI, list[tuple[bytes, bytes]]]] = {
        "bare": (make_app(enabled=False), plain),
        "middleware": (make_app(), plain),
        "middleware, token cookie": (make_app(), cookies),
        "middleware, sticky + method level": (
            make_app(sticky_key=user, method_consistency={"GET": "eventual"}),
            cookies,
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}

    async def run() -> None:
        for app, headers in variants.values():  # warm up (and build the middleware stacks)
            await measure(app, headers, 200)
        for _ in range(args.rounds):
            names = list(variants)
            random.shuffle(names)
            for name in names:
                app, headers = variants[name]
                results[name].append(await measure(app, headers, args.requests))

    asyncio.run(run())
    versions = f"FastAPI {fastapi.__version__}, Starlette {starlette.__version__}"
    print(f"{versions}; {args.rounds} rounds x {args.requests} requests, CPU us/request (median)")
    bare = statistics.median(results["bare"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:<36} {median:8.1f} us   x{median / bare:.3f}   (+{median - bare:.1f} us)")


if __name__ == "__main__":
    main()
