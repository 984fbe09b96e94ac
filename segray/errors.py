"""Turning any failure into the one line a job prints before it exits non-zero.

The line names the cause a user can act on. segray's own errors name the file and the fix, so
one of them anywhere in the chain wins over the exception that started it (a wrapped pyarrow
message such as "enable the allow_bucket_creation option" is not a segray user's fix). Ray
wraps an exception raised in a task or an actor (``RayTaskError``, ``.cause``), and Ray Data
wraps a map function's exception in ``UserCodeException("UDF failed to process a data block.")``
whose ``__cause__`` does not survive the trip between processes: then the traceback text that
Ray keeps is searched for the original exception's line.
"""

from __future__ import annotations

import re

# A job's last line is read by people and by CI logs: long enough for two URIs and a fix.
MAX_LINE = 600
# Exceptions that only say "something below failed": never the line to print while a more
# specific one is known.
_WRAPPERS = ("RayTaskError", "UserCodeException", "RayActorError", "ActorDiedError", "RaySystemError",
             "TaskError", "SystemException", "TrainingFailedError", "WorkerGroupError", "ControllerError")
# "pkg.mod.SomeError: message" lines of a Python traceback (Ray keeps the worker's as text).
_TRACEBACK_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (.+)$")


class SegrayError(Exception):
    """Base of segray's own errors: a thing a user can fix, named with the fix in the message.

    Every error segray raises on purpose (PrepareError, TrainError, InferError, DatasetError,
    ModelError, StorageError, ...) derives from it, so a caller can tell segray's refusals from
    bugs, and :func:`one_line` prefers its message. Each also derives from the builtin class it
    has always been (ValueError for a bad value, RuntimeError for a failed storage operation,
    tarfile.TarError for a broken archive), so existing ``except`` clauses keep working."""


class ConfigError(SegrayError, ValueError):
    """A setting that cannot be used; the message names its flag."""


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it wraps (``.cause``, ``__cause__``, ``__context__``), outermost first."""
    out: list[BaseException] = []
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return out


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


def _is_segray(exc: BaseException) -> bool:
    if isinstance(exc, SegrayError):
        return True
    return any(c.__module__.split(".")[0] == "segray" for c in type(exc).__mro__ if c is not BaseException)


def _name(exc: BaseException) -> str:
    name = type(exc).__name__
    # Ray's dual classes are named "RayTaskError(ValueError)": the user's class is the one inside.
    m = re.match(r"RayTaskError\((\w+)\)", name)
    return m.group(1) if m else name


def _is_wrapper(exc: BaseException) -> bool:
    return type(exc).__name__.startswith(_WRAPPERS)


def _message(exc: BaseException) -> str:
    """The exception's own message on one line (a RayTaskError's str is a whole traceback)."""
    if type(exc).__name__.startswith("RayTaskError"):
        cause = getattr(exc, "cause", None)
        return _message(cause) if isinstance(cause, BaseException) and cause is not exc else ""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still has a class
        text = ""
    return " ".join(text.split())


def describe(exc: BaseException) -> str:
    """``Type: message`` of this one exception, on one line (for an error row or a wrapped message)."""
    message = _message(exc)
    return f"{_name(exc)}: {message}" if message else _name(exc)


def _from_tracebacks(exceptions: list[BaseException]) -> tuple[str, str] | None:
    """(class, message) of the deepest non-wrapper exception line in Ray's traceback texts,
    preferring segray's own (``segray.x.FooError: ...``)."""
    found: list[tuple[bool, str, str]] = []
    for e in exceptions:
        text = getattr(e, "traceback_str", None)
        if not isinstance(text, str):
            continue
        for line in text.splitlines():
            line = line.strip()
            m = _TRACEBACK_LINE.match(line)
            if m and not m.group(1).startswith(_WRAPPERS):
                found.append((line.startswith("segray."), m.group(1), m.group(2)))
    if not found:
        return None
    own = [f for f in found if f[0]]
    _, name, msg = (own or found)[0]
    return name, msg


def _shorten(text: str, limit: int = MAX_LINE) -> str:
    """At most ``limit`` characters, cut at a word boundary with an ellipsis, never mid-word."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " …"


def one_line(exc: BaseException) -> str:
    """``'<Type>: <message>'``, one line, for a job's final error line (module doc: which one)."""
    exceptions = chain(exc)
    own = [e for e in exceptions if _is_segray(e) and _message(e)]
    if own:
        pick = own[0]  # the outermost: raised where segray knew the most (the URI and the fix)
        return _shorten(f"{_name(pick)}: {_message(pick)}")
    specific = [e for e in exceptions if not _is_wrapper(e) and _message(e)]
    from_text = _from_tracebacks(exceptions)
    if from_text and not specific:
        return _shorten(f"{from_text[0]}: {from_text[1]}")
    if specific:
        pick = specific[-1]
        return _shorten(f"{_name(pick)}: {_message(pick)}")
    with_message = [e for e in exceptions if _message(e)]
    if with_message:
        pick = with_message[-1]
        return _shorten(f"{_name(pick)}: {_message(pick)}")
    root = root_cause(exc)
    return f"{_name(root)} (raised without a message)"
