"""Plans: generators that yield requests, receive their answers and return a result, and the one way to run them.

Every multi-step computation of the package is a plan: a method's plan yields model calls (the engine packs those of
many items), an estimator's plan yields feature masks, a quadrature rule yields the points it needs. ``advance`` is
one step, ``drive`` runs a plan with an answering function, and ``relay`` runs a plan inside another plan, each of
its requests answered by a sub-plan of the outer one's requests (``result = yield from relay(inner, ask)``).
"""

from __future__ import annotations

from typing import Any, Callable, Generator, TypeVar

Q = TypeVar("Q")  # what a plan asks for
A = TypeVar("A")  # what it is answered
R = TypeVar("R")  # what it returns
Q2 = TypeVar("Q2")
A2 = TypeVar("A2")

Plan = Generator[Q, A, R]


def advance(plan: Generator[Q, A, R], answer: Any = None) -> tuple[bool, Any]:
    """Send ``answer`` to ``plan`` (None starts it): ``(False, next request)``, or ``(True, return value)`` once it
    has returned."""
    try:
        return False, plan.send(answer)
    except StopIteration as stop:
        return True, stop.value


def drive(plan: Generator[Q, A, R], answer: Callable[[Q], A]) -> R:
    """Run ``plan`` to its end, answering each request with ``answer(request)``; its return value."""
    done, value = advance(plan)
    while not done:
        done, value = advance(plan, answer(value))
    return value


def relay(plan: Generator[Q, A, R], ask: Callable[[Q], Generator[Q2, A2, A]]) -> Generator[Q2, A2, R]:
    """``plan`` run inside an outer plan: each of its requests is answered by the sub-plan ``ask(request)``, whose
    own requests the outer plan yields. Returns ``plan``'s return value."""
    done, value = advance(plan)
    while not done:
        reply = yield from ask(value)
        done, value = advance(plan, reply)
    return value
