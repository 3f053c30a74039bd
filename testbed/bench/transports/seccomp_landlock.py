"""Stock QEMU under the seccomp supervisor and Landlock: it can open its images only
through the supervisor (``testbed supervise --landlock``).  The ruleset is built in the
supervisor's ``popen``, so inside the start-up clock."""

from __future__ import annotations

from testbed.bench.transports.seccomp import Seccomp


class SeccompLandlock(Seccomp):
    name = "seccomp_landlock"
    what = "stock QEMU under the seccomp supervisor and Landlock (no image access of its own)"
    landlock = True


PART = SeccompLandlock()
