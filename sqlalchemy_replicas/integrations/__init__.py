"""Web framework integrations: carry causal tokens across requests.

- :mod:`sqlalchemy_replicas.integrations.wsgi`: ``CausalMiddleware`` for any
  WSGI application (Flask, Django, Pyramid, Falcon, ...).
- :mod:`sqlalchemy_replicas.integrations.flask`: a Flask extension built on it.

Each module imports its framework only when imported itself.
"""
