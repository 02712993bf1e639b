"""Whether replication works, as the replication process last found it.

A step that fails (the mirror refuses us, or cannot be reached) is tried
again with backoff for as long as it fails, so that replication resumes
by itself once the cause is fixed. Every failure goes through
:class:`Health`, which keeps the log to one line per cause:

- the first failure with a cause: one ERROR line, the cause and what to do;
- the same cause met again: a DEBUG line only, and one WARNING an hour
  (``REMIND_EVERY``) saying that replication is still stopped, and why;
- another cause: its own ERROR line;
- the first round that works after failures: one INFO line, replication
  resumed, and how long it was stopped.

Two causes are the same when their messages differ in numbers only (the
pack, journal segment or snapshot being sent, a count of attempts).

The cause in force is kept in the catalog's ``meta`` as one JSON value
(``mirror.trouble``: kind, cause, since, last logged), written in one
transaction and removed on recovery. The status commands and the admin
API read it there (:mod:`appliance.overview`); a replication process
started again reads it too, and does not log the same ERROR once more.

Two kinds of cause: the mirror **refuses** us (its host key is unknown or
changed, it refuses our login, it holds another archive, a name on it
holds other bytes, its folder cannot be written), which someone must fix;
or replication **fails** otherwise (the mirror cannot be reached, a pack
failed its read-back), which may pass by itself.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from appliance.catalog.store import Catalog
from appliance.errors import (
    ForeignMirrorError,
    HostKeyError,
    LoginRefusedError,
    MirrorConflictError,
)

logger = logging.getLogger(__name__)

REFUSED = "refused"
FAILING = "failing"
# Seconds between two WARNING lines while the same cause persists.
REMIND_EVERY = 3600.0
_NOTE = b"mirror.trouble"
_REFUSALS = (ForeignMirrorError, HostKeyError, LoginRefusedError, MirrorConflictError)
# What the operating system answers for a folder the appliance may not write.
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class Trouble:
    """What stops replication: its kind, the cause in words, since when
    (Unix time), and when it was last logged above DEBUG."""

    kind: str
    cause: str
    since: float
    logged: float

    def same_cause(self, kind: str, cause: str) -> bool:
        return (self.kind, _numbers_out(self.cause)) == (kind, _numbers_out(cause))


def kind_of(exc: BaseException) -> str:
    """REFUSED when the mirror refuses us (someone must act), else FAILING."""
    if isinstance(exc, _REFUSALS) or _denied(exc):
        return REFUSED
    return FAILING


def read_trouble(catalog: Catalog) -> Trouble | None:
    """The cause that stops replication now, None while it works."""
    with catalog.read() as txn:
        raw = txn.get(_NOTE, db=catalog.db["meta"])
    if not raw:
        return None
    try:
        return Trouble(**json.loads(bytes(raw)))
    except (ValueError, TypeError) as exc:
        logger.warning("the mirror's recorded state is unreadable: %s", exc)
        return None


class Health:
    """Logs the replication process's failures once per cause and keeps
    the cause in force in the catalog (see the module's description).

    ``alert`` is called once with each new cause's exception (the service
    raises a security alert for a changed host key).
    """

    def __init__(
        self,
        catalog: Catalog,
        clock: Callable[[], float] = time.time,
        alert: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.clock = clock
        self.alert = alert
        self.trouble = read_trouble(catalog)

    def failed(self, exc: BaseException) -> bool:
        """Note a failed step, to be tried again; whether its cause is new
        (then logged at ERROR)."""
        now = self.clock()
        kind, cause = kind_of(exc), str(exc) or type(exc).__name__
        known = self.trouble
        if known is not None and known.same_cause(kind, cause):
            if now - known.logged < REMIND_EVERY:
                logger.debug("replication: still stopped: %s", cause)
                return False
            logger.warning(
                "replication still stopped, since %s: %s%s",
                _when(known.since),
                _prefix(kind),
                cause,
            )
            self._keep(replace(known, cause=cause, logged=now))
            return False

        self._keep(Trouble(kind, cause, now, now))
        logger.error(
            "replication stopped: %s%s%s; it is tried again by itself, with "
            "backoff, and resumes once this is fixed",
            _prefix(kind),
            cause,
            _advice(exc),
        )
        if self.alert is not None:
            self.alert(exc)
        return True

    def worked(self) -> None:
        """Note a round that worked: if a cause was recorded, remove it and
        say once that replication resumed."""
        known = self.trouble
        if known is None:
            return
        self._keep(None)
        logger.info(
            "replication resumed after %.0f s stopped (since %s: %s%s)",
            max(0.0, self.clock() - known.since),
            _when(known.since),
            _prefix(known.kind),
            known.cause,
        )

    def _keep(self, trouble: Trouble | None) -> None:
        with self.catalog.env.begin(write=True, db=self.catalog.db["meta"]) as txn:
            if trouble is None:
                txn.delete(_NOTE)
            else:
                txn.put(_NOTE, json.dumps(asdict(trouble)).encode())
        self.trouble = trouble


def describe(trouble: Trouble) -> str:
    """The state in words, for the status commands."""
    since = _when(trouble.since)
    if trouble.kind == REFUSED:
        return f"stopped: the mirror refuses us since {since}: {trouble.cause}"
    return f"stopped since {since}, retrying: {trouble.cause}"


def _prefix(kind: str) -> str:
    return "the mirror refuses us: " if kind == REFUSED else ""


def _advice(exc: BaseException) -> str:
    """What to do, when the message itself does not say."""
    if isinstance(exc, _REFUSALS) or not _denied(exc):
        return ""
    return (
        " (let the appliance's user write the mirror's folder, or mount it read-write)"
    )


def _denied(exc: BaseException) -> bool:
    """Whether the failure, or what it was raised from, is a refused write."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DENIED:
            return True
        seen = seen.__cause__
    return False


def _numbers_out(text: str) -> str:
    return re.sub(r"\d+", "#", text)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
