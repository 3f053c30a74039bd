"""libvirt as the real client of the hook: Debian's libvirtd runs the patched QEMU.

* :mod:`testbed.libvirt.emulator` -- the ``<emulator>`` wrapper (standard library only);
* :mod:`testbed.libvirt.install` -- world-readable copies for libvirt's QEMU user;
* :mod:`testbed.libvirt.domain` -- the domain XML and its policy, side by side;
* :mod:`testbed.libvirt.serve` -- a domain's broker, as root, on one connection;
* :mod:`testbed.libvirt.daemons` -- libvirtd and virtlogd started by hand;
* :mod:`testbed.libvirt.virsh` -- ``virsh`` calls with timeouts;
* :mod:`testbed.libvirt.demo` -- ``testbed libvirt demo``;
* :mod:`testbed.libvirt.command` -- the ``testbed libvirt`` subcommand.
"""
