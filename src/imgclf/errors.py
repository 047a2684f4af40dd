"""The exceptions that reach users as one-line messages, the messages of the others, and the small input checks
(flags, whole numbers, spelling hints) that raise them."""

import contextlib
import difflib
import errno
import logging
import math
import numbers
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path


class ImgclfError(Exception):
    """A problem the user can fix: the message names the problem and the fix.

    The CLI prints it as a single line and exits with status 1; it never shows a traceback.
    """


@contextlib.contextmanager
def quieter_loggers(level: int, *names: str):
    """The libraries' loggers `names` show only `level` and above while the block runs, then their own levels."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.setLevel(old)


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """' (did you mean 'lr'?)' for a misspelt name close to one of the choices, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_whole(value: object, minimum: int = 1, maximum: int | None = None) -> bool:
    """Whether value is a whole number (numpy's too, never a bool) from minimum to maximum."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum))


def is_number(value: object) -> bool:
    """Whether value is a real number (numpy's too, never a bool: True would pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A real number that is neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def disk_full(folder: str | Path) -> bool:
    """Whether the disk of `folder` is (nearly) full: a failure there is likely that, whatever a library raised."""
    try:
        return shutil.disk_usage(folder).free < 64 << 20
    except OSError:
        return False


def check_flags(**flags: object) -> None:
    """Each flag is True or False: a string such as "no" would be true."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ImgclfError(f"{name} is True or False, not {value!r}")


def one_line(message: object) -> str:
    """The message with its line breaks written as \\n: a file or folder name may hold one, and a message stays
    one line."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"imgclf: warning: {one_line(message)}", file=sys.stderr)  # not Python's two lines naming our source file


def unexpected(e: Exception) -> str:
    """The one line for an exception that is not an ImgclfError: a refused path or a full disk is still the
    user's to fix; anything else is a bug, to report."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f"{e.filename}: " if e.filename else ""
        message = (f"error: {where}no space left on the device; free some space and run again (what was written "
                   "before is kept: each file is replaced whole or not at all)")
    elif isinstance(e, OSError) and e.filename is not None:  # a path the system refused: bad input after all
        message = f"error: {e.filename}: {e.strerror or e}; check the path (--out?) and its permissions"
    else:
        message = (f"internal error: {type(e).__name__}: {e} (rerun with IMGCLF_DEBUG=1 for the traceback and please "
                   "report it)")
    return one_line(message)


class PeerLost(ImgclfError):
    """In distributed training, another rank died or stopped answering; every rank reports it, not only rank 0."""


class UsageError(ImgclfError):
    """A command line whose options do not go together (argparse cannot tell); exit status 2, as argparse's."""
