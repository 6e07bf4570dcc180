"""The error every user-facing failure of asteroid_fx derives from.

``AsteroidError`` subclasses ``ValueError`` so that code written against the earlier, plain
``ValueError``s keeps working; its message says what is wrong and what to do next. ``InputError``
is a file, argument or peer message that does not say what it must: readers raise it (naming the
file and the field) instead of leaking ``KeyError``/``IndexError``/``TypeError``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class AsteroidError(ValueError):
    """Base of every error asteroid_fx raises on purpose."""


class InputError(AsteroidError):
    """A file, argument or message that does not hold what it must; the message names which."""


class VerifyError(AsteroidError):
    """A Program that must not be executed; ``problems`` holds one line per problem found."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


class DeadlockError(VerifyError):
    """A Program that cannot finish: ``steps`` ran (each a list of (device, action index)), then
    ``blocked`` (device -> index of the action it waits in) could not move. The verifier's dry run
    and the simulator raise it."""

    def __init__(self, message: str, steps: Sequence[Sequence[tuple[str, int]]], blocked: Mapping[str, int]) -> None:
        super().__init__(message)
        self.steps = [list(s) for s in steps]
        self.blocked = dict(blocked)


class SeveralStagesError(AsteroidError):
    """A question about "the" stage of a device that holds several (virtual stages)."""

    def __init__(self, device: str, stages: tuple[int, ...]) -> None:
        listed = ", ".join(str(s) for s in stages[:-1]) + f" and {stages[-1]}"
        super().__init__(f"device {device} holds stages {listed}; use stages_of (or slot_of with a stage) "
                         "to ask about one of them")
        self.device, self.stages = device, stages
