"""Where failing examples are kept: a local directory, optionally shared through Redis.

``ISOLATION_DATABASE`` / ``--database`` is one of

- a directory (``.hypothesis/examples`` by default): Hypothesis's ``DirectoryBasedExampleDatabase``;
- ``none``: no database;
- ``redis://HOST:PORT/DB``: Hypothesis's ``RedisExampleDatabase``, multiplexed with the local
  directory ``.hypothesis/examples``. Every failure a machine finds is saved in both, and every
  machine replays the shared failures first (Hypothesis's reuse phase) on its next run.

Read-only (``--database-readonly``, ``ISOLATION_DATABASE_READONLY=1``) wraps the named database in
Hypothesis's ``ReadOnlyDatabase``: its failures are replayed, nothing is written to it (a shared
Redis is then read with ``SMEMBERS`` alone, see :class:`RedisReader`). With a Redis URL the local
directory beside it stays writable, so a laptop keeps its own failures locally and never changes
the shared store.

The shared store is a :class:`SharedDatabase`: a Redis that is down, or goes away during a run,
costs one warning, never the run; from the first error on the store answers as an empty one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from hypothesis.database import (DirectoryBasedExampleDatabase, ExampleDatabase, MultiplexedDatabase,
                                 ReadOnlyDatabase)

DEFAULT_DIRECTORY = ".hypothesis/examples"
REDIS_SCHEMES = ("redis", "rediss")
#: seconds: a dead or unreachable host costs at most this much once, then the store is empty
CONNECT_TIMEOUT_S = 1.0
OPERATION_TIMEOUT_S = 2.0
OPERATIONS = ("fetch", "save", "delete", "move")


class DatabaseSpecError(ValueError):
    """A database spec that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class DatabaseSpec:
    """What ``--database`` named: a local directory, a shared Redis URL (with the local directory
    beside it), or neither; ``readonly``: the named database is only read."""

    directory: str | None = DEFAULT_DIRECTORY
    redis_url: str | None = None
    readonly: bool = False

    def describe(self) -> str:
        """``.hypothesis/examples + redis://host:6379/0 (read-only)``, without credentials."""
        if self.redis_url:
            return f"{self.directory} + {public_url(self.redis_url)}" + (" (read-only)" if self.readonly else "")
        if self.directory:
            return self.directory + (" (read-only)" if self.readonly else "")
        return "none"


def parse_spec(text: str | None, readonly: bool = False) -> DatabaseSpec:
    """``none`` | a directory | ``redis://HOST:PORT/DB``; a malformed URL raises :class:`DatabaseSpecError`."""
    text = (text if text is not None else DEFAULT_DIRECTORY).strip()
    if text.lower() in ("", "none", "off"):
        return DatabaseSpec(directory=None, readonly=readonly)
    if "://" not in text:
        return DatabaseSpec(directory=text, readonly=readonly)
    return DatabaseSpec(redis_url=validate_redis_url(text), readonly=readonly)


def validate_redis_url(url: str) -> str:
    parts = urlsplit(url)
    bad = f"database {public_url(url)!r}"
    if parts.scheme not in REDIS_SCHEMES:
        raise DatabaseSpecError(f"{bad}: unsupported scheme {parts.scheme!r}; use a directory, 'none' or "
                                f"redis://HOST:PORT/DB")
    if not parts.hostname:
        raise DatabaseSpecError(f"{bad}: no host; use redis://HOST:PORT/DB")
    try:
        port = parts.port
    except ValueError:
        raise DatabaseSpecError(f"{bad}: the port must be a number from 1 to 65535") from None
    if port == 0:
        raise DatabaseSpecError(f"{bad}: the port must be a number from 1 to 65535")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise DatabaseSpecError(f"{bad}: the database must be a number (redis://HOST:PORT/0), got {db!r}")
    if parts.query or parts.fragment:
        raise DatabaseSpecError(f"{bad}: options after '?' or '#' are not supported")
    return url


def public_url(url: str) -> str:
    """The URL without its password, fit for logs and reports."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


class SharedDatabase(ExampleDatabase):
    """The shared store (a ``RedisExampleDatabase``) made safe to lose, and measured.

    The first Redis error (refused, timed out, dropped, an error reply) is kept as ``unavailable``
    (one line naming the URL); from then on every call answers as an empty database, so the run
    goes on with its local directory alone. ``stats`` counts the calls and seconds per operation;
    calls answered after the store was lost count as ``skipped``.
    """

    def __init__(self, store: ExampleDatabase, url: str, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.store, self.url, self.errors = store, url, errors
        self.unavailable: str | None = None
        self.stats: dict[str, dict[str, float]] = {op: {"calls": 0, "seconds": 0.0} for op in OPERATIONS}
        self.stats["skipped"] = {"calls": 0, "seconds": 0.0}

    def __repr__(self) -> str:
        return f"SharedDatabase({public_url(self.url)})"

    def _call(self, op: str, run):
        if self.unavailable is not None:
            self.stats["skipped"]["calls"] += 1
            return None
        started = time.perf_counter()
        try:
            return run()
        except self.errors as exc:
            self.unavailable = (f"shared example database {public_url(self.url)} unavailable "
                                f"({type(exc).__name__}: {_one_line(exc)}); going on without it")
            return None
        finally:
            self.stats[op]["calls"] += 1
            self.stats[op]["seconds"] += time.perf_counter() - started

    def fetch(self, key: bytes) -> Iterable[bytes]:
        # read eagerly: an error must surface here, inside the guard, not in Hypothesis's loop
        return self._call("fetch", lambda: list(self.store.fetch(key))) or []

    def save(self, key: bytes, value: bytes) -> None:
        self._call("save", lambda: self.store.save(key, value))

    def delete(self, key: bytes, value: bytes) -> None:
        self._call("delete", lambda: self.store.delete(key, value))

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self._call("move", lambda: self.store.move(src, dest, value))

    # change listening (used by no isolation-suite feature) is not offered for the shared store
    def _start_listening(self) -> None:
        pass

    def _stop_listening(self) -> None:
        pass

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {op: dict(counts) for op, counts in self.stats.items()}


def stats_since(before: dict[str, dict[str, float]], now: dict[str, dict[str, float]]) -> dict[str, dict]:
    """The calls and seconds per operation between two snapshots (seconds rounded to microseconds)."""
    return {op: {"calls": int(now[op]["calls"] - before[op]["calls"]),
                 "seconds": round(now[op]["seconds"] - before[op]["seconds"], 6)} for op in now}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "no message"


class IsolationDatabase(MultiplexedDatabase):
    """The profiles' database: the parts a spec names, with the spec and the shared store at hand."""

    def __init__(self, spec: DatabaseSpec, *parts: ExampleDatabase, shared: SharedDatabase | None = None):
        super().__init__(*parts)
        self.spec, self.shared = spec, shared

    def __repr__(self) -> str:
        return f"IsolationDatabase({self.spec.describe()})"


class RedisReader(ExampleDatabase):
    """The entries of a ``RedisExampleDatabase`` read with ``SMEMBERS`` alone, for read-only use.

    Hypothesis's own ``fetch`` also refreshes the entry's expiry (an ``EXPIRE``, a write): a
    read-only user must not change the shared store at all, and a Redis user allowed only read
    commands (or a read-only replica) would refuse it. Never writes."""

    def __init__(self, client, key_prefix: bytes):
        super().__init__()
        self.client, self.key_prefix = client, key_prefix

    def fetch(self, key: bytes) -> Iterable[bytes]:
        return list(self.client.smembers(self.key_prefix + key))

    def save(self, key: bytes, value: bytes) -> None:
        pass

    def delete(self, key: bytes, value: bytes) -> None:
        pass


#: Hypothesis's own default, so the entries are the ones any ``RedisExampleDatabase`` user sees
KEY_PREFIX = b"hypothesis-example:"


def redis_store(url: str, readonly: bool = False) -> SharedDatabase:
    """A ``RedisExampleDatabase`` (a :class:`RedisReader` when ``readonly``) for ``url``, with short
    timeouts and no retries, inside a :class:`SharedDatabase`. Nothing connects yet: the first fetch does."""
    import redis
    from hypothesis.extra.redis import RedisExampleDatabase
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=OPERATION_TIMEOUT_S,
                                  retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
    store = RedisReader(client, KEY_PREFIX) if readonly else RedisExampleDatabase(client, key_prefix=KEY_PREFIX)
    return SharedDatabase(store, url, (redis.exceptions.RedisError, OSError))


def build(spec: DatabaseSpec) -> IsolationDatabase | None:
    """The Hypothesis database for ``spec`` (None for ``none``)."""
    if spec.redis_url:
        shared = redis_store(spec.redis_url, spec.readonly)
        local = DirectoryBasedExampleDatabase(spec.directory or DEFAULT_DIRECTORY)
        return IsolationDatabase(spec, local, ReadOnlyDatabase(shared) if spec.readonly else shared, shared=shared)
    if spec.directory:
        local = DirectoryBasedExampleDatabase(spec.directory)
        return IsolationDatabase(spec, ReadOnlyDatabase(local) if spec.readonly else local)
    return None
