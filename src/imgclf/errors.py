"""The one exception type that reaches users as a one-line message."""


class ImgclfError(Exception):
    """A problem the user can fix: the message names the problem and the fix.

    The CLI prints it as a single line and exits with status 1; it never shows a traceback.
    """


class PeerLost(ImgclfError):
    """In distributed training, another rank died or stopped answering; every rank reports it, not only rank 0."""
