"""Fetching the next study's packs while the current one is extracted.

The data phase reads the mirror and writes the online tier at the same
time: one thread of its own fetches the packs of study N+1 into the pack
cache while the instances of study N are extracted, checked and written.
It is one study ahead at most, so the cache holds the packs of two studies
besides those an earlier run left. A fetch that fails raises in the
restore's own thread when it reaches that study, as a fetch made there
would have; a fetch cut off by a stop leaves no file behind (the fetcher
writes under a temporary name).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger(__name__)

# A study's fetch, given a test that says when to give up.
FetchJob = Callable[[Callable[[], bool]], None]


class FetchAbandoned(Exception):
    """A fetch cut off because the data phase stops (not an error)."""


class FetchAhead:
    """Runs the fetches of studies one after the other, in a thread of its
    own, in the order they were asked for."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, "restore-fetch")
        self._asked: dict[str, Future[None]] = {}
        self._abandoned = threading.Event()

    def ask(self, study_uid: str, job: FetchJob) -> None:
        """Fetch the study's packs once the studies asked before are done."""
        if study_uid not in self._asked:
            self._asked[study_uid] = self._pool.submit(job, self._abandoned.is_set)

    def asked(self, study_uid: str) -> bool:
        return study_uid in self._asked

    def wait(self, study_uid: str) -> None:
        """Until the study's packs are fetched; raises what the fetch raised."""
        self._asked.pop(study_uid).result()

    def close(self) -> None:
        """Stop: what is not started is dropped, a fetch under way is cut
        off; returns once the thread is idle (the transport is free)."""
        self._abandoned.set()
        for future in self._asked.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for study_uid, future in self._asked.items():
            if future.cancelled():
                continue
            problem = future.exception()
            if problem is not None and not isinstance(problem, FetchAbandoned):
                logger.info(
                    "packs of study %s fetched ahead, then not used: %s",
                    study_uid,
                    problem,
                )
        self._asked.clear()


def abandon_if(abandoned: Callable[[], bool]) -> Callable[[int], None]:
    """A fetcher's byte count callback that cuts the fetch off once
    ``abandoned()`` says so."""

    def received(_size: int) -> None:
        if abandoned():
            raise FetchAbandoned("the restore stops")

    return received
