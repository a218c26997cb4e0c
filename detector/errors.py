"""Mistakes a user can fix, the one way every entry point reports them, and the one table
of exit statuses.

A command (`python -m detector ...`, `python -m batch`) or the service's start-up check that
meets one prints a single `error: ...` line on stderr and exits with status 2, so a person
reads what to do and an orchestrator can tell "could not run" from "crashed" (a traceback,
status 1). Set DETECTOR_DEBUG=1 to get the traceback back when the one line is not enough.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, NoReturn, TypeVar


class Exit(IntEnum):
    """Every entry point's exit statuses; a job engine's retry rules key on them
    (deploy/k8s/batch-indexed-job.yaml fails the Job on 2 and retries the rest)."""

    OK = 0
    CRASHED = 1  # a traceback: a bug to report
    CANNOT_RUN = 2  # a user's mistake; one `error:` line says what to do; retrying won't help
    INTERRUPTED = 3  # stopped part-way (a signal, an unexpected error): the same command resumes
    BUSY = 4  # another job holds the output folder: retry later
    DIFFERENCES = 5  # replay: some recorded decisions are not what the models give now


USER_ERROR_EXIT_CODE = Exit.CANNOT_RUN
Main = TypeVar("Main", bound=Callable[..., Any])


class UserError(Exception):
    """Something the user can fix (a missing model, a wrong path, a bad setting); the
    message is one sentence saying what to do. A service answers it with `status` and the
    one-word `reason` (detector/serving/answers.py), a command exits with code 2."""

    status, reason = 400, "bad_request"


# ValueError and FileNotFoundError too: configuration parsers and file lookups raise them
# for what are, at a command's top level, the user's mistakes.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, ValueError)


def exit_with(error: BaseException | str) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_CODE)


@contextmanager
def user_errors_exit() -> Iterator[None]:
    """Turn a user error raised inside the block into `error: ...` and exit status 2."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("DETECTOR_DEBUG"):
            raise
        exit_with(error)


def exits_on_user_error(main: Main) -> Main:
    """`user_errors_exit` as a decorator, for a command's `main`."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors_exit():
            return main(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
