"""Per-request overhead of the Flask extension (the WSGI CausalMiddleware).

A tiny view (``return "ok"``, no database) served three ways, side by side:

- ``Flask``: a plain app;
- ``Flask + Replicas``: the same app after ``Replicas().init_app(app,
  router=...)``, a request without token (a new visitor);
- ``Flask + Replicas, token``: the same, the request carrying a token
  cookie (its decode is the middleware's main work), and a default level
  for GET and a sticky key.

Each request is a full WSGI call of ``app`` (environ built once, body read,
response closed), no test client, so the figure is the middleware's share of
Flask's own request handling. The router is a SQLite one (no replicas): the
view makes no query, so no server is needed. Rounds run in shuffled order
and ratios of medians are reported.

    python benchmarks/flask_overhead.py [--requests 5000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import flask
from werkzeug.test import EnvironBuilder

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.integrations.flask import Replicas

SECRET = "benchmark secret"


def make_app(router: sr.ReplicaRouter | None, **options: object) -> flask.Flask:
    app = flask.Flask("bench")

    @app.get("/")
    def tiny() -> str:
        return "ok"

    if router is not None:
        Replicas().init_app(
            app,
            router=router,
            method_consistency={"GET": "eventual"} if options.get("levels") else None,
            sticky_key=(lambda environ: "user-1") if options.get("levels") else None,
        )
    return app


def request_loop(app: flask.Flask, cookie: str | None, requests: int) -> Callable[[], float]:
    headers = [("Cookie", f"db_causal={cookie}")] if cookie else []
    environ = EnvironBuilder(path="/", headers=headers).get_environ()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Any:
        return None

    def run() -> float:
        started = time.perf_counter()
        for _ in range(requests):
            body = app(dict(environ), start_response)
            b"".join(body)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return (time.perf_counter() - started) / requests

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    router = sr.ReplicaRouter("sqlite://", secret=SECRET)
    # A genuine token of this router's name, as a returning visitor sends it
    # (never verified here: the view makes no query).
    entry = tokens.sign(SECRET, "default", "pg", "lineage", "0/3000060", time.time())
    token = tokens.encode({"default": entry})
    cases = {
        "Flask": request_loop(make_app(None), None, args.requests),
        "Flask + Replicas": request_loop(make_app(router), None, args.requests),
        "Flask + Replicas, token": request_loop(
            make_app(router, levels=True), token, args.requests
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        order = list(cases)
        random.shuffle(order)
        for name in order:
            samples[name].append(cases[name]())
    base = statistics.median(samples["Flask"])
    print(f"{args.requests} requests x {args.rounds} rounds, median per request:")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:<26} {median * 1e6:8.1f} us   x{median / base:.2f}")
    router.dispose()


if __name__ == "__main__":
    main()
