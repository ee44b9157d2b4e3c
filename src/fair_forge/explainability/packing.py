"""Several explanations side by side, their masked rows packed into shared model batches (``explain_batch``).

Each item's method runs unchanged in a worker thread, with a scorer whose model calls are handed to the
coordinator (the thread that called ``run``): it waits until every running worker is blocked on a model call (or
finished), then runs all of them, packing the masked-row requests of different items into the same model batches
(``scoring.score_row_requests``) and running any other call one by one. Only the coordinator touches the model, so
grad mode, torch threads and the borrowed model behave as in a plain loop, and workers only do their methods' own
bookkeeping (sampling coalitions, fitting surrogates) between calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .scoring import RowRequest, ScoreKind, TargetScorer, score_row_requests

_PENDING = object()  # a job's result before it ran
_NO_INPUTS = {"input_ids": None, "inputs_embeds": None, "attention_mask": None, "prefix": None}
PACKED_ITEMS = 8  # items explained side by side by default: enough to fill a batch with small ones' masks
Outcome = tuple[bool, Any]  # (True, result) or (False, the exception it raised)


@dataclass(eq=False)
class _Job:
    """One model call waiting for the coordinator: packable ``rows`` of ``scorer``, or an opaque ``call``."""

    scorer: Optional[TargetScorer] = None
    rows: Optional[RowRequest] = None
    call: Optional[Callable[[], Any]] = None
    result: Any = _PENDING
    error: Optional[BaseException] = None
    done: bool = False


class PackedScorer(TargetScorer):
    """A TargetScorer for a worker thread: it hands every model call to the coordinator instead of making it."""

    def __init__(self, model: Any, coordinator: "Coordinator", *, score: ScoreKind, prefix_cache: bool) -> None:
        super().__init__(model, score=score, batch_size=coordinator.batch_size, prefix_cache=prefix_cache)
        self._coordinator = coordinator
        self._prefixes = coordinator.prefixes  # a dataset's shared system prompt / chat header runs once for all items

    def prefix(self, input_ids: torch.Tensor, length: int):  # noqa: ANN201 - same as TargetScorer.prefix
        return self._coordinator.submit(_Job(call=lambda: TargetScorer.prefix(self, input_ids, length)))

    def target_log_probs(self, target_ids: torch.Tensor, *, count: bool = True, **inputs: Any) -> torch.Tensor:
        call = lambda: self._forward(target_ids, count=count, **{**_NO_INPUTS, **inputs})  # noqa: E731
        return self._coordinator.submit(_Job(call=call))

    def score_rows(self, request: RowRequest, batch_size: int) -> torch.Tensor:
        return self._coordinator.submit(_Job(scorer=self, rows=request))


class Coordinator:
    """Runs tasks in worker threads and their model calls in the calling thread, packed across tasks."""

    def __init__(self, batch_size: int, max_workers: int) -> None:
        self.batch_size = batch_size
        self.max_workers = max_workers
        self._condition = threading.Condition()
        self._jobs: list[_Job] = []
        self._running = 0
        self._finished: list[int] = []
        self._closed = False
        self.prefixes: dict = {}  # TargetScorer prefix caches, shared by every task's scorer

    def scorer(self, model: Any, *, score: ScoreKind, prefix_cache: bool) -> PackedScorer:
        """A scorer for one task: its model calls go through this coordinator."""
        return PackedScorer(model, self, score=score, prefix_cache=prefix_cache)

    # ---- worker side ------------------------------------------------------------------------------------------

    def submit(self, job: _Job) -> Any:
        """Hand ``job`` to the coordinator and wait for its result (called from a worker thread)."""
        with self._condition:
            if self._closed:
                raise RuntimeError("the packed run was stopped")
            self._jobs.append(job)
            self._condition.notify_all()
            self._condition.wait_for(lambda: job.done)
        if job.error is not None:
            raise job.error
        return job.result

    # ---- coordinator side -------------------------------------------------------------------------------------

    def run(self, tasks: Sequence[Callable[[], Any]], on_done: Callable[[int], None] = lambda index: None) -> list[Outcome]:
        """Run every task (at most ``max_workers`` at once); (True, result) or (False, exception) per task."""
        outcomes: list[Outcome] = [(False, None)] * len(tasks)
        started = 0

        def work(index: int) -> None:
            try:
                outcomes[index] = (True, tasks[index]())
            except BaseException as error:  # noqa: BLE001 - handed to the caller, which records it per item
                outcomes[index] = (False, error)
            finally:
                with self._condition:
                    self._running -= 1
                    self._finished.append(index)
                    self._condition.notify_all()

        try:
            while True:
                with self._condition:
                    while started < len(tasks) and self._running < self.max_workers:
                        self._running += 1
                        threading.Thread(target=work, args=(started,), daemon=True, name=f"explain-{started}").start()
                        started += 1
                    self._condition.wait_for(lambda: self._finished or self._all_blocked() or not self._running)
                    finished, self._finished = self._finished, []
                    jobs = self._jobs if self._all_blocked() else []
                    if jobs:
                        self._jobs = []
                    if not finished and not jobs and not self._running and started == len(tasks):
                        return outcomes
                for index in finished:
                    on_done(index)
                if jobs:
                    self._execute(jobs)
        finally:
            with self._condition:  # on an interrupt, workers waiting for a call get an error instead of hanging
                self._closed = True
                for job in self._jobs:
                    job.error, job.done = RuntimeError("the packed run was stopped"), True
                self._condition.notify_all()

    def _all_blocked(self) -> bool:
        return bool(self._running) and len(self._jobs) == self._running

    def _execute(self, jobs: list[_Job]) -> None:
        """Run the waiting calls: row requests packed together (retried one by one if that fails), calls alone."""
        try:
            packable = [job for job in jobs if job.rows is not None]
            if packable:
                try:
                    results = score_row_requests([(job.scorer, job.rows) for job in packable], self.batch_size)
                    for job, result in zip(packable, results):
                        job.result = result
                except Exception:  # noqa: BLE001 - find which item's rows fail, so the others still get their scores
                    for job in packable:
                        self._settle(job, lambda job=job: score_row_requests([(job.scorer, job.rows)], self.batch_size)[0])
            for job in jobs:
                if job.call is not None:
                    self._settle(job, job.call)
        finally:
            with self._condition:
                for job in jobs:
                    if job.result is _PENDING and job.error is None:  # interrupted before this job ran
                        job.error = RuntimeError("the packed run was stopped")
                    job.done = True
                self._condition.notify_all()

    @staticmethod
    def _settle(job: _Job, call: Callable[[], Any]) -> None:
        try:
            job.result = call()
        except Exception as error:  # noqa: BLE001 - raised in the worker that asked for it
            job.error = error
