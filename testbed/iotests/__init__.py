"""QEMU's own iotests run through the open hook: ``testbed iotests``.

* :mod:`testbed.iotests.builds` -- the QEMU builds and the tools the suite needs;
* :mod:`testbed.iotests.selection` -- which tests start qemu-system, and the plan;
* :mod:`testbed.iotests.exclusions` -- tests left out, with their reasons;
* :mod:`testbed.iotests.modes` -- unhooked / hooked / supervised and their wrappers;
* :mod:`testbed.iotests.hook` -- the hooked wrapper (broker on a socketpair, exec QEMU);
* :mod:`testbed.iotests.runner` -- the build-like tree, one ``check`` per test;
* :mod:`testbed.iotests.results`, :mod:`testbed.iotests.report` -- JSON and Markdown.

Nothing is imported here: the hook runs once per QEMU launch and must start fast.
"""
