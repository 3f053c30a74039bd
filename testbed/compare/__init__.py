"""The differential comparison: one scenario, four oracles, one report.

* :mod:`testbed.compare.scenarios` -- the scenario matrix (image, attach, operations);
* :mod:`testbed.compare.trace` / :mod:`testbed.compare.normalise` -- raw opens
  (audit records, strace) to comparable traces;
* :mod:`testbed.compare.compare` -- the comparator and the known divergences;
* :mod:`testbed.compare.runners` -- model, patched QEMU, stock QEMU, fd sets;
* :mod:`testbed.compare.run` -- running scenarios and collecting results;
* :mod:`testbed.compare.report` -- terminal table, JSON, Markdown and HTML;
* :mod:`testbed.compare.command` -- ``testbed compare``.
"""
