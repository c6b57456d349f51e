"""Clear, one-line errors for bad input.

Every reader raises :class:`InputError` naming the file or config key and what is wrong. Entry points wrap their
body in :func:`exit_on_input_error`, which prints that one line to stderr and exits with code 2; set the
environment variable ``LANDMARK_UNET_DEBUG=1`` to get the full stack trace instead. An :class:`InputError` raised
inside a constructor that Hydra's ``instantiate`` called reaches the entry point wrapped in Hydra's
``InstantiationException`` (``raise ... from err``); it is reported the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input (a file, a folder or a config key). The message names it and says what is wrong."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(self.where, problem)  # args that rebuild it: it crosses processes (submitit) by pickle

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


class MissingLandmarksError(InputError):
    """A subject has no usable landmarks (no file, or no plausible pair found by the detector)."""


def input_error_of(err: BaseException) -> InputError | None:
    """``err`` itself if it is an :class:`InputError`, else the one it was raised from (``__cause__``, followed
    through wrappers such as Hydra's ``InstantiationException``), else None."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, InputError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an :class:`InputError` (or an exception raised from one) into ``error: <where>: <problem>`` on stderr
    and exit code 2."""
    try:
        yield
    except Exception as err:
        bad = input_error_of(err)
        if bad is None or os.environ.get("LANDMARK_UNET_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {bad}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
