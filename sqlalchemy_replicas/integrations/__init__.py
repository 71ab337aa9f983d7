"""Integrations with the frameworks and tools applications run the router in.

- :mod:`sqlalchemy_replicas.integrations.asgi`: ``CausalMiddleware`` for ASGI
  applications (Starlette, FastAPI, Litestar).
- :mod:`sqlalchemy_replicas.integrations.fastapi`: dependencies that yield a
  routed session.
- :mod:`sqlalchemy_replicas.integrations.wsgi`: ``CausalMiddleware`` for any
  WSGI application (Flask, Django, Pyramid, Falcon, ...).
- :mod:`sqlalchemy_replicas.integrations.flask`: a Flask extension built on it.
- :mod:`sqlalchemy_replicas.integrations.celery`: causal tokens in task
  headers (the framework-free helpers are in :mod:`sqlalchemy_replicas.jobs`).
- :mod:`sqlalchemy_replicas.integrations.alembic`: migrations on the primary,
  then a bounded wait for the replicas.
- :mod:`sqlalchemy_replicas.integrations.prometheus`: a collector exporting
  ``router.stats()`` and ``router.status()`` at scrape time.
- :mod:`sqlalchemy_replicas.integrations.opentelemetry`: each routed
  statement's server, target, reason and wait on the current span.

Each module imports its framework only when imported itself: importing
``sqlalchemy_replicas`` never imports any of them.
"""
