"""The fd-passing benchmark (``testbed bench``).

Transports, each measured in the same run on the same file:

- ``broker``: the project's broker process over -open-hook-fd, N client
  processes (:mod:`testbed.bench.brokerload`, clients in
  :mod:`testbed.bench.client`);
- ``c_limit``, ``c_floor``, ``c_pidfd``: a C ping-pong doing the same
  exchange, open+close with no passing, and pidfd_getfd(2)
  (:mod:`testbed.bench.climit`, source ``c_limit.c``);
- ``qmp_add_fd``: QMP ``add-fd`` + ``remove-fd`` against a real QEMU, and
  ``blockdev_add_*``: ``blockdev-add`` + ``blockdev-del`` of a file node by
  path, through ``/dev/fdset/N`` and through the hook (:mod:`testbed.bench.qmpload`).

:mod:`testbed.bench.runner` runs a plan, :mod:`testbed.bench.results` holds
the figures and ratios, :mod:`testbed.bench.report` prints, writes JSON and
plots.
"""
