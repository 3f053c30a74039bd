"""The fd-passing benchmark (``testbed bench``): costs users feel, as ratios in one run.

- :mod:`testbed.bench.experiments`: what is measured (ping-pong, client
  sweep, fd handover vs QMP add-fd, blockdev-add, QEMU start-up against
  chain depth, blockdev-snapshot-sync, start storms), each interleaving the
  transports it compares repetition by repetition
  (:mod:`testbed.bench.interleave`);
- :mod:`testbed.bench.servers` and :mod:`testbed.bench.transports`: the
  registries of ping-pong servers (the broker, the Python floor, the C
  open-hook-server, the C limit) and of the ways images reach QEMU (by
  path, hook with the Python broker or the C server, fd sets);
- :mod:`testbed.bench.syscalls` and :mod:`testbed.bench.pyfloor`: the
  Python floor, derived from an strace of the broker;
- :mod:`testbed.bench.goals`: the issue's goals, each ratio the median of
  per-repetition ratios; :mod:`testbed.bench.runner` runs a
  :mod:`testbed.bench.plan`; :mod:`testbed.bench.report` prints, writes
  JSON, markdown and plots.
"""
