"""A FastAPI app on a primary and replicas: create an item, see it in the list.

``python -m examples.fastapi_app`` starts a local PostgreSQL topology and
serves the app; see README.md.
"""

from .app import Base, Item, create_app

__all__ = ["Base", "Item", "create_app"]
