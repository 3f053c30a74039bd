"""Stock QEMU under the seccomp supervisor: every open served by user notification.

The unmodified binary of the version (Debian's for 7.2, the unpatched build
for 10.0), started through a :class:`~testbed.supervise.Supervisor` of its
own, in the harness's process, granted the bench directory (create) as the
broker daemon is, with the default system profile (which adds a build's own
installation prefix, read-only: ``command_prefix`` in docs/supervise.md).
The supervisor is made before the clock starts; its ``popen`` (the filter's
assembly, the handshake thread, fork, the filter installed in the child,
the listener handed back) is inside it, as it is part of starting a
supervised QEMU.  Compare with ``path_debian``, the same
binary by path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.qemus import Build
from testbed.bench.transports import Services, Transport, blockdev_args, chain_node
from testbed.errors import KernelFeatureError
from testbed.supervise import Supervisor
from testbed.supervise import landlock as ll
from testbed.supervise.seccomp import check_user_notification


class Seccomp(Transport):
    name = "seccomp"
    what = "stock QEMU under the seccomp supervisor (every open served by user notification)"
    build = Build.STOCK
    landlock: ClassVar[bool] = False

    def unavailable(self, version: str) -> str | None:
        why = super().unavailable(version)
        if why:
            return why
        try:
            check_user_notification()
            if self.landlock:
                ll.abi_version()
        except KernelFeatureError as err:
            return str(err)
        return None

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        sup = Supervisor(services.policy(), landlock=self.landlock, keep_records=False)
        return Launch(
            args=blockdev_args(chain_node(chain)) if chain else (),
            popen=sup.popen,
            finished=sup.close,
        )


PART = Seccomp()
