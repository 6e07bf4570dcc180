"""The error every user-facing failure of asteroid_fx derives from.

``AsteroidError`` subclasses ``ValueError`` so that code written against the earlier, plain
``ValueError``s keeps working; its message says what is wrong and what to do next. ``InputError``
is a file, argument or peer message that does not say what it must: readers raise it (naming the
file and the field) instead of leaking ``KeyError``/``IndexError``/``TypeError``."""

from __future__ import annotations


class AsteroidError(ValueError):
    """Base of every error asteroid_fx raises on purpose."""


class InputError(AsteroidError):
    """A file, argument or message that does not hold what it must; the message names which."""
