"""The differential comparison: one scenario, every registered oracle, one report.

* :mod:`testbed.compare.scenarios` -- the scenario matrix (image, attach, operations);
  :mod:`testbed.compare.attach` -- the attachments (``AttachMode``) and their options;
* :mod:`testbed.compare.trace` / :mod:`testbed.compare.normalise` -- raw opens
  (audit records, strace) to comparable traces;
* :mod:`testbed.compare.compare` -- the comparator, ``Status`` and the known divergences;
* :mod:`testbed.compare.oracles` -- the oracle registry (``ORACLES``, ``PAIRS``): each
  oracle's runner and what the report shows of it;
* :mod:`testbed.compare.runners` -- model, patched QEMU, stock QEMU, fd sets, seccomp;
* :mod:`testbed.compare.run` -- running scenarios and collecting results;
* :mod:`testbed.compare.report` -- terminal table, JSON, Markdown and HTML;
* :mod:`testbed.compare.command` -- ``testbed compare``.
"""
