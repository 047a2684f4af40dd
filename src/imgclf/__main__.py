import contextlib
import os
import sys

from imgclf.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun rank skips the interpreter's teardown: gloo's threads, destroyed there after the process group,
    # now and then aborted a finished rank ("terminate called without an active exception"), failing the job
    # after its model was saved. Everything is written by now; only the streams need flushing.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away: nothing left to say
            stream.flush()
    os._exit(code)
raise SystemExit(code)
