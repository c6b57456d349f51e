"""Clear, one-line errors for bad input.

Every reader raises :class:`InputError` naming the file or config key and what is wrong. Entry points wrap their
body in :func:`exit_on_input_error`, which prints that one line to stderr and exits with code 2; set the
environment variable ``LANDMARK_UNET_DEBUG=1`` to get the full stack trace instead. An :class:`InputError` raised
inside a constructor that Hydra's ``instantiate`` called reaches the entry point wrapped in Hydra's
``InstantiationException`` (``raise ... from err``); it is reported the same way. The Hydra entry points run
through :func:`run_hydra_main`, which reports Hydra's own command-line errors (a key the config lacks, a config
group option that does not exist, an override that does not parse) the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

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


def message_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its class name when the message is empty): what a one-line error
    quotes of an exception raised by someone else's code."""
    return (str(err).strip().splitlines() or [err.__class__.__name__])[0]


def _debug() -> bool:
    return os.environ.get("LANDMARK_UNET_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an :class:`InputError` (or an exception raised from one) into ``error: <where>: <problem>`` on stderr
    and exit code 2."""
    try:
        yield
    except Exception as err:
        bad = input_error_of(err)
        if bad is None or _debug():
            raise
        print(f"error: {bad}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def run_hydra_main(main: Callable[[], object]) -> None:
    """Runs a ``@hydra.main`` entry point, with Hydra's own errors about the command line reported as one line
    and exit code 2 like every other bad input: ``error: model: no option 'unet9' (choose from unet2d, ...)``.
    Hydra alone printed several lines and exited with code 1. Any other error is raised as it is (with its full
    stack trace: Hydra is told to raise rather than report, ``HYDRA_FULL_ERROR``); ``LANDMARK_UNET_DEBUG=1`` leaves
    Hydra's own report."""
    if _debug():
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        line = hydra_error_line(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def hydra_error_line(err: BaseException) -> str | None:
    """One line for Hydra's error about a command line (``<where>: <problem>``), or None for any other error."""
    errors = sys.modules.get("hydra.errors")
    if errors is None or not isinstance(err, errors.CompactHydraException):
        return None
    if isinstance(err, errors.MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        return f"{group}: no option {name!r} (choose from {', '.join(err.options)})"
    if isinstance(err, errors.OverrideParseException):
        return f"{err.override}: cannot parse this override ({str(err.message).strip().splitlines()[0]})"
    lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
    if isinstance(err, errors.MissingConfigException):
        lines = lines[:1]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        lines.append(message_line(cause).rstrip("."))
    return "command line: " + "; ".join(lines) if lines else None
