"""The batch engine: one single-threaded driver that runs the plans of many items and packs their model calls.

A method's plan is a generator: it yields requests (``requests.MaskedRows``, ``requests.EmbeddingRows``), receives
their answers and returns its ``RawAttribution``. The driver keeps a window of at most ``window`` items in flight,
refilled in input order. Each round it takes the one pending request of every item in flight, answers them all
through the packer (``packer.answer_requests``: rows of every item in shared, budgeted calls, shortest with
shortest, a prefix shared by items computed once) and sends each item its answer. An item whose plan returns is
yielded at once. Nothing here depends on timing: the same items and settings make the same rounds, the same calls
and so bit-identical results and pass counts on every run. No threads, no locks, no global RNG.

Accounting, per item (its ``TargetScorer.count``): the passes its rows took part in, the tokens of its own rows,
and as time the share of each call it took part in (in proportion to its rows) plus the time its own plan ran.
A failure in an item's plan, or in a packed call (then retried one item at a time, so only the item whose rows
fail fails), is handed back for that item and the others go on. ``KeyboardInterrupt`` and other non-``Exception``
errors stop the run; the plans in flight are closed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Optional, Union

from ..text.prompt import ModelInput
from ..core.plans import advance
from .answers import answer_requests
from .requests import Request
from .scorer import TargetScorer

ITEMS_IN_FLIGHT = 16  # default window: enough small items to fill a call; memory grows with it, not with the data

Plan = Generator[Request, Any, Any]


@dataclass
class Job:
    """One prepared item: its input, the scorer that calls the model for it and counts its share, and its plan
    (a generator, not started)."""

    index: int
    model_input: ModelInput
    scorer: TargetScorer
    plan: Plan


@dataclass(frozen=True)
class Rejected:
    """An item that failed before it could run (e.g. a malformed item); passed through in order."""

    index: int
    error: Exception


@dataclass(frozen=True)
class Finished:
    """An item's outcome: its plan's return value, or the exception that stopped it; ``job`` is None for a
    ``Rejected`` item."""

    index: int
    value: Any
    error: Optional[Exception]
    job: Optional[Job]


class _Flight:
    """An item in flight: its job and the request it waits on."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.request: Optional[Request] = None
        self.outcome: Optional[Finished] = None

    def advance(self, answer: Any) -> None:
        """Run the plan up to its next request (or its end); its own time goes to the item's count."""
        count = self.job.scorer.count
        started, calls_before = time.perf_counter(), count.seconds
        try:
            done, value = advance(self.job.plan, answer)
            if done:
                self.outcome = Finished(self.job.index, value, None, self.job)
            else:
                self.request = value
        except Exception as error:  # noqa: BLE001 - recorded for this item; the others go on
            self.fail(error)
        finally:  # calls the plan made itself (plain backends) are already in count.seconds
            count.seconds += (time.perf_counter() - started) - (count.seconds - calls_before)

    def fail(self, error: Exception) -> None:
        self.job.plan.close()
        self.outcome = Finished(self.job.index, None, error, self.job)


def run(jobs: Iterable[Union[Job, Rejected]], *, batch_size: Optional[int] = None,
        window: int = ITEMS_IN_FLIGHT, on_round: Callable[[], None] = lambda: None) -> Iterator[Finished]:
    """Run every job's plan, ``window`` at a time, packing their requests; yields each item's outcome as it ends.

    ``batch_size`` caps the rows per model call (None: the packer's budgets, ``packer.rows_per_call``);
    ``on_round`` is called after each round of answered requests (progress of a long explanation).
    """
    source = iter(jobs)
    flights: list[_Flight] = []
    exhausted = False
    try:
        while True:
            while not exhausted and len(flights) < window:
                job = next(source, None)
                if job is None:
                    exhausted = True
                elif isinstance(job, Rejected):
                    yield Finished(job.index, None, job.error, None)
                else:
                    flight = _Flight(job)
                    flight.advance(None)
                    if flight.outcome is not None:
                        yield flight.outcome
                    else:
                        flights.append(flight)
            if not flights:
                return
            _answer(flights, batch_size)
            on_round()
            waiting = []
            for flight in flights:
                if flight.outcome is not None:
                    yield flight.outcome
                else:
                    waiting.append(flight)
            flights = waiting
    finally:
        for flight in flights:
            flight.job.plan.close()


def _answer(flights: list[_Flight], batch_size: Optional[int]) -> None:
    """Answer every flight's pending request in packed calls and advance its plan; if the packed calls fail, answer
    each flight alone so that only the one whose rows fail gets the error."""
    counts = [dataclasses.replace(flight.job.scorer.count) for flight in flights]
    try:
        answers = answer_requests([_request(flight) for flight in flights], batch_size)
    except Exception:  # noqa: BLE001 - retried per item below
        for flight, count in zip(flights, counts):
            flight.job.scorer.count = count  # the failed attempt's calls are not the items' own
            try:
                (answer,) = answer_requests([_request(flight)], batch_size)
            except Exception as error:  # noqa: BLE001 - recorded for this item
                flight.fail(error)
            else:
                flight.advance(answer)
        return
    for flight, answer in zip(flights, answers):
        flight.advance(answer)


def _request(flight: _Flight) -> tuple[TargetScorer, ModelInput, Request]:
    return flight.job.scorer, flight.job.model_input, flight.request
