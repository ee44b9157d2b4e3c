"""Several explanations side by side, their model inputs packed into shared model calls (``explain_batch``).

Each item's method runs unchanged in a worker thread, with a scorer whose model calls are handed to the
coordinator (the thread that called ``run``): it waits until every running worker is blocked on a model call (or
finished), then runs all of them. Masked-row requests of different items go into the same model batches
(``scoring.score_row_requests``); embedding rows whose gradient a method needs go into one forward and one backward
pass (``scoring.score_embedding_requests``) and come back to the worker as scores carrying that gradient
(``_KnownGradient``), so captum differentiates them as usual. Any other call runs one by one, as it would alone
(a per-target matrix's backward then runs in its worker). Only the coordinator runs forward passes, so the
borrowed model and torch's settings behave as in a plain loop; workers do their methods' own bookkeeping
(sampling coalitions, fitting surrogates, captum's arithmetic) between calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .scoring import (
    EmbeddingRequest,
    Prefix,
    RowRequest,
    ScoreKind,
    TargetScorer,
    score_embedding_requests,
    score_row_requests,
)

_PENDING = object()  # a job's result before it ran
_NO_INPUTS = {"input_ids": None, "inputs_embeds": None, "attention_mask": None, "prefix": None}
PACKED_ITEMS = 8  # items explained side by side by default: enough to fill a batch with small ones' masks
Outcome = tuple[bool, Any]  # (True, result) or (False, the exception it raised)


@dataclass(eq=False)
class _Job:
    """One model call waiting for the coordinator: packable ``rows`` or ``embeddings`` of ``scorer``, or an opaque
    ``call``."""

    scorer: Optional[TargetScorer] = None
    rows: Optional[RowRequest] = None
    embeddings: Optional[EmbeddingRequest] = None
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

    def prefix(self, input_ids: torch.Tensor, length: int) -> Optional[Prefix]:
        return self._coordinator.submit(_Job(call=lambda: TargetScorer.prefix(self, input_ids, length)))

    def target_log_probs(self, target_ids: torch.Tensor, *, count: bool = True, **inputs: Any) -> torch.Tensor:
        grad = torch.is_grad_enabled()  # grad mode is per thread: the call runs in the coordinator's, with this one

        def call() -> torch.Tensor:
            with torch.set_grad_enabled(grad):
                return self._forward(target_ids, count=count, **{**_NO_INPUTS, **inputs})

        return self._coordinator.submit(_Job(call=call))

    def score_rows(self, request: RowRequest, batch_size: int) -> torch.Tensor:
        return self._coordinator.submit(_Job(scorer=self, rows=request))

    def score_embeddings(self, target_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                         prefix: Optional[Prefix] = None) -> torch.Tensor:
        if not (torch.is_grad_enabled() and inputs_embeds.requires_grad):
            return super().score_embeddings(target_ids, inputs_embeds, prefix)  # through target_log_probs: a call
        request = EmbeddingRequest(inputs_embeds.detach(), target_ids, prefix)
        scores, gradients = self._coordinator.submit(_Job(scorer=self, embeddings=request))
        return _KnownGradient.apply(inputs_embeds, scores, gradients)


class _KnownGradient(torch.autograd.Function):
    """Scores computed in the coordinator's packed pass, whose gradient w.r.t. the input came back with them: the
    worker's autograd (captum's) differentiates through them as if the model had run in its own graph."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, scores: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gradients)
        return scores.clone()

    @staticmethod
    def backward(ctx: Any, grad_scores: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (gradients,) = ctx.saved_tensors
        return grad_scores.reshape(-1, *[1] * (gradients.dim() - 1)) * gradients, None, None


class Coordinator:
    """Runs tasks in worker threads and their model calls in the calling thread, packed across tasks."""

    def __init__(self, batch_size: Optional[int], max_workers: int, tokens_per_call: int) -> None:
        self.batch_size = batch_size  # masked rows per model call (None: sized by scoring.masked_rows_per_call)
        self.tokens_per_call = tokens_per_call  # embedding rows x length per forward + backward pass
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
        """Run the waiting calls: row and embedding requests packed together, other calls one by one."""
        try:
            self._packed([job for job in jobs if job.embeddings is not None], lambda job: job.embeddings,
                         lambda requests: score_embedding_requests(requests, self.tokens_per_call))
            self._packed([job for job in jobs if job.rows is not None], lambda job: job.rows,
                         lambda requests: score_row_requests(requests, self.batch_size))
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

    def _packed(self, jobs: list[_Job], request: Callable[[_Job], Any],
                score: Callable[[list[tuple[TargetScorer, Any]]], list[Any]]) -> None:
        """Score the requests of ``jobs`` together; if that fails, one by one, so only the failing job gets the error."""
        if not jobs:
            return
        try:
            for job, result in zip(jobs, score([(job.scorer, request(job)) for job in jobs])):
                job.result = result
        except Exception:  # noqa: BLE001 - retried per job below
            for job in jobs:
                self._settle(job, lambda job=job: score([(job.scorer, request(job))])[0])

    @staticmethod
    def _settle(job: _Job, call: Callable[[], Any]) -> None:
        try:
            job.result = call()
        except Exception as error:  # noqa: BLE001 - raised in the worker that asked for it
            job.error = error
