"""The open-hook-fd testbed.

Parts (one subpackage each): ``protocol`` (the pure wire codec),
``transport`` (SCM_RIGHTS over UNIX sockets), ``broker`` (the privileged
side), ``block`` (a model of QEMU's block-layer open path), ``qemu`` (the
patched QEMU and a machine wrapper), ``compare``, ``bench`` and ``guest``.
"""

__version__ = "0.1.0"
