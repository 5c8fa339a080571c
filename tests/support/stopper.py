"""Run the vmfs-crypt CLI so that it stops itself (SIGSTOP) at its Nth crash point around a rename: a test SIGKILLs it there.

`python tests/support/stopper.py N ARGS...` is `vmfs-crypt ARGS...` with os.rename and os.replace
counted in this process only (the agent it starts is another process): point 2k-1 is just before
the kth rename, point 2k just after it. Every commit step of the offline operations is a rename
(the staged files, the journal, the folder key file: FORMAT.md 7.6), so N = 1, 2, ... walks through
each crash point of a commit. Test-only; the code under test is unchanged.
"""

import os
import runpy
import signal
import sys


def main() -> None:
    stop_at = int(sys.argv[1])
    count = 0

    def counted(real):
        def rename(*args, **kwargs):
            nonlocal count
            for step in ("before", "after"):
                if step == "after":
                    real(*args, **kwargs)
                count += 1
                if count == stop_at:
                    os.kill(os.getpid(), signal.SIGSTOP)
        return rename

    os.rename, os.replace = counted(os.rename), counted(os.replace)
    sys.argv = ["vmfs-crypt"] + sys.argv[2:]
    runpy.run_module("vmfs_crypt.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
