"""Serve an unmodified program's opens with seccomp user notification; confine it with Landlock.

The hook without a patch: a seccomp filter turns every ``open``, ``openat``,
``openat2`` and ``creat`` of the supervised process into a notification that
the supervisor answers by opening the file itself, under the broker's
:class:`~testbed.broker.Policy` and :class:`~testbed.broker.Gate`, and
installing the descriptor in the caller.  Landlock then makes it impossible
for the process to open its images by itself.  See docs/supervise.md.
"""

from testbed.supervise.profile import DEFAULT_PROFILE, SystemProfile, load_profile
from testbed.supervise.supervisor import Supervisor, supervised_popen

__all__ = ["DEFAULT_PROFILE", "Supervisor", "SystemProfile", "load_profile", "supervised_popen"]
