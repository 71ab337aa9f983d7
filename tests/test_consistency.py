"""consistency(): levels per block and per function, isolated per thread and task."""

from __future__ import annotations

import asyncio
import threading

import pytest

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.consistency import ConsistencySetting, current_consistency
from sqlalchemy_replicas.exc import ConfigurationError


def level() -> str | None:
    setting = current_consistency()
    return None if setting is None else setting.level


def test_context_manager_nests_and_restores() -> None:
    """Inner blocks win; leaving a block restores the outer level, also on errors."""
    assert level() is None
    seen: list[str | None] = []

    def failing_inner_block() -> None:
        with sr.consistency("strong"):
            seen.append(level())
            raise RuntimeError

    with sr.consistency("eventual"):
        assert level() == "eventual"
        with pytest.raises(RuntimeError):
            failing_inner_block()
        assert seen == ["strong"]
        assert level() == "eventual"
    assert level() is None


def test_decorates_sync_and_async_functions() -> None:
    """As a decorator the level holds while the function (or coroutine) runs."""

    @sr.consistency("strong")
    def view() -> str | None:
        return level()

    @sr.consistency("bounded", max_lag=2.0)
    async def async_view() -> ConsistencySetting | None:
        await asyncio.sleep(0)
        return current_consistency()

    assert view() == "strong"
    assert asyncio.run(async_view()) == ConsistencySetting("bounded", 2.0)
    assert level() is None
    assert view.__name__ == "view"


def test_default_consistency_nests_checks_its_level_and_decorates() -> None:
    """default_consistency() stacks like consistency(), separately from it,
    and rejects an unknown level where it is given."""
    assert sr.default_consistency.current() is None
    with sr.default_consistency("eventual"):
        with sr.default_consistency("strong"):
            assert sr.default_consistency.current() == "strong"
        assert sr.default_consistency.current() == "eventual"
        assert level() is None  # not a consistency() block

    @sr.default_consistency("monotonic")
    async def view() -> str | None:
        return sr.default_consistency.current()

    assert asyncio.run(view()) == "monotonic"
    assert sr.default_consistency.current() is None
    with pytest.raises(ConfigurationError, match="not a consistency level"):
        sr.default_consistency("bogus")  # type: ignore[arg-type]


def test_isolated_per_thread_and_per_task() -> None:
    """A level set in one thread or task is not seen by another."""
    seen: dict[str, str | None] = {}
    inside = threading.Event()
    release = threading.Event()

    def worker() -> None:
        with sr.consistency("strong"):
            inside.set()
            release.wait(5)
            seen["worker"] = level()

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    seen["main"] = level()
    release.set()
    thread.join(5)
    assert seen == {"worker": "strong", "main": None}

    async def both() -> list[str | None]:
        entered: list[str] = []
        all_inside = asyncio.Event()

        async def task(chosen: sr.ConsistencyLevel) -> str | None:
            with sr.consistency(chosen):
                entered.append(chosen)
                if len(entered) == 2:
                    all_inside.set()
                await all_inside.wait()  # both blocks are open at once here
                return level()

        return list(await asyncio.gather(task("eventual"), task("strong")))

    assert asyncio.run(both()) == ["eventual", "strong"]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("bogus",), {}, "level='bogus' is not a consistency level"),
        (("strong",), {"max_lag": 1.0}, r"max_lag applies to consistency\('bounded'\) only"),
        (("bounded",), {"max_lag": -1}, "max_lag=-1 is invalid"),
        (("bounded",), {"max_lag": "2"}, "max_lag must be a number"),
    ],
)
def test_bad_arguments_raise_where_given(
    args: tuple[str], kwargs: dict[str, object], message: str
) -> None:
    """consistency() itself rejects unknown levels and bad max_lag values."""
    with pytest.raises(ConfigurationError, match=message):
        sr.consistency(*args, **kwargs)  # type: ignore[arg-type]
