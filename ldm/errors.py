"""User errors: what the person running a command got wrong, as opposed to a bug.

`UserError` is the one exception type for a mistake in what the user asked for: a value out of
range, a path that does not exist or holds the wrong kind of folder, an id the model does not
know, a file that cannot be read as what it claims to be. Its message names what is wrong and
says what to do. The ``ldm`` CLI (``launch/cli.py``) prints it as one line and exits with status
2; every other exception is a bug and keeps its traceback. ``--debug`` or ``LDM_DEBUG=1`` shows
the traceback of a user error too.

`UserError` subclasses `ValueError`, so code that catches ``ValueError`` keeps working.
`checking` turns the ``ValueError`` / ``KeyError`` / ``FileNotFoundError`` of a validation call
(config parsing, listing an input, a model's size check) into a `UserError` at the place where
user input meets the library, without rewriting every check below it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(ValueError):
    """A mistake in the user's input; the message says what is wrong and what to do."""


class MissingInput(UserError, FileNotFoundError):
    """A path the user named does not exist (also a ``FileNotFoundError``)."""


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1:  # str(KeyError) quotes its message
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e)


@contextlib.contextmanager
def checking(what: str | None = None) -> Iterator[None]:
    """Inside, a ``ValueError``, ``KeyError``, ``FileNotFoundError`` or ``NotADirectoryError`` is
    the user's input being rejected: it is raised again as a `UserError` (prefixed with ``what``,
    e.g. the flag being checked). Wrap validation calls only, never the work itself: a bug inside
    would lose its traceback."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        text = _message(e)
        kind = MissingInput if isinstance(e, FileNotFoundError) else UserError
        raise kind(f"{what}: {text}" if what else text) from e


def check_min(values: dict[str, float | int | None], low: float | int, note: str = "") -> None:
    """Each ``flag -> value`` (None: not given, skipped) is at least ``low``; else a `UserError`
    ``FLAG must be >= LOW, got VALUE`` (plus ``note``)."""
    for flag, value in values.items():
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}{note}")
