"""The exception types that reach users as a one-line message, and a spelling hint for its messages."""

import difflib
from collections.abc import Iterable


class ImgclfError(Exception):
    """A problem the user can fix: the message names the problem and the fix.

    The CLI prints it as a single line and exits with status 1; it never shows a traceback.
    """


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """' (did you mean 'lr'?)' for a misspelt name close to one of the choices, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class PeerLost(ImgclfError):
    """In distributed training, another rank died or stopped answering; every rank reports it, not only rank 0."""


class UsageError(ImgclfError):
    """A command line whose options do not go together (argparse cannot tell); exit status 2, as argparse's."""
