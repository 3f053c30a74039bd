"""The four oracles of a scenario: the model, patched QEMU, stock QEMU, fd sets.

Each runner takes a :class:`~testbed.compare.runners.setup.Setup` (the
scenario, its image and a fresh copy of the image directory) and returns an
:class:`~testbed.compare.runners.result.OracleResult`.
"""
