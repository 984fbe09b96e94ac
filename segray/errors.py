"""Turning any failure into the one line a job prints before it exits non-zero."""

from __future__ import annotations


def root_cause(exc: BaseException) -> BaseException:
    """Follow ``__cause__`` and Ray's ``.cause`` to the exception that started it all."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def one_line(exc: BaseException) -> str:
    """``'<Type>: <first line of message>'`` of the root cause, for a job's final error line."""
    root = root_cause(exc)
    text = str(root).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(root).__name__}: {msg}" if msg else type(root).__name__
