"""The Flask example app: post an item, get redirected, see the list.

An app factory over a router; sessions come from the extension's
``replicas.session`` (one per request, through the app's router). The
causal token travels in the ``db_causal`` cookie, so the list shown after
the redirect has the new item even when that GET lands on another app
server whose replicas have not applied it yet.
"""

from __future__ import annotations

import html

import flask
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.wrappers import Response as WerkzeugResponse

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations.flask import Replicas


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))


#: One extension object for every app made by create_app (each keeps its router).
replicas = Replicas()
views = flask.Blueprint("items", __name__)


@views.get("/")
def list_items() -> str:
    """The list, read from a replica that has applied the client's writes."""
    names = replicas.session.scalars(sa.select(Item.name).order_by(Item.id)).all()
    rows = "".join(f"<li>{html.escape(name)}</li>" for name in names)
    return (
        "<!doctype html><title>Items</title>"
        '<form method="post" action="/items"><input name="name" required>'
        "<button>Add</button></form>"
        f"<ul>{rows}</ul>"
    )


@views.post("/items")
def create_item() -> WerkzeugResponse:
    """Insert the posted item (on the primary), then redirect to the list."""
    name = flask.request.form.get("name", "").strip()
    if not name:
        flask.abort(400, "name is required")
    replicas.session.add(Item(name=name))
    replicas.session.commit()
    return flask.redirect(flask.url_for("items.list_items"), code=303)


@views.get("/health")
@sr.consistency("strong")
def health() -> dict[str, object]:
    """The item count from the primary (a view-level consistency decorator)."""
    return {"items": replicas.session.scalar(sa.select(sa.func.count()).select_from(Item))}


def create_app(router: sr.ReplicaRouter[Engine]) -> flask.Flask:
    """An app serving the items through ``router`` (which needs a ``secret``)."""
    app = flask.Flask(__name__)
    replicas.init_app(app, router=router)
    app.register_blueprint(views)
    return app
