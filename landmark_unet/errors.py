"""Clear, one-line errors for bad input.

Every reader raises :class:`InputError` naming the file or config key and what is wrong. Entry points wrap their
body in :func:`exit_on_input_error`, which prints that one line to stderr and exits with code 2; set the
environment variable ``LANDMARK_UNET_DEBUG=1`` to get the full stack trace instead.
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


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an :class:`InputError` into ``error: <where>: <problem>`` on stderr and exit code 2."""
    try:
        yield
    except InputError as err:
        if os.environ.get("LANDMARK_UNET_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
