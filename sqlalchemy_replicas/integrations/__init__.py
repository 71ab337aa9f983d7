"""Web framework and tool integrations: each module imports its framework
only when it is imported itself (``asgi``, ``fastapi``, ...)."""
