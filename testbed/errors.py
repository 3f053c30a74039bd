"""The testbed's errors, all under one root.

::

    TestbedError
     +-- ProtocolError                 the -open-hook-fd wire protocol
     |    +-- LocalProtocolError       we misused the codec (our fault)
     |    +-- RemoteProtocolError      the peer sent an illegal frame (its fault)
     |    |    +-- FrameDecodeError    ... and ``kind`` says which framing rule it broke
     |    +-- OpenFlagsError (also ValueError)  a spelled-out open flag is unknown
     +-- TransportError                sendmsg/recvmsg, fd passing, a dead peer
     +-- PolicyError                   a broker policy file or flag is invalid
     +-- AuditWriteError               the broker's audit log could not be written
     +-- BrokerStateError (also RuntimeError)  a broker asked to do what its state forbids
     +-- CorruptImageError             an image's metadata is inconsistent
     +-- BlockError                    the block-layer model refused an operation
     |    +-- BlockUsageError (also ValueError)  the model was called with impossible arguments
     |    +-- UnknownFormatError (also KeyError)  no format driver by that name
     +-- WaitTimeout (also TimeoutError)  a wait ran out; names what it waited for
     +-- BuildError                    building QEMU, images or the guest failed
     |    +-- MissingBuildError        a QEMU build that was asked for is not there
     +-- QemuVersionError              a QEMU version or binary kind nobody registered
     |    +-- UnknownProgramError (also ValueError)  no such program in a QEMU build
     +-- QEMUError                     a QEMU process failed
     |    +-- LaunchError              QEMU did not start: command line, exit code, log
     |    +-- QMPCommandError          QEMU answered a QMP command with an error
     |    +-- QEMUUsageError (also ValueError)  the wrapper was called with impossible arguments
     +-- CommandLineError (also ValueError)  a QEMU command line cannot be built from its config
     +-- GuestError                    the guest did not do what a step expected
     +-- GuestUsageError (also ValueError)  guest options or a session's use that cannot work
     +-- VerifyError                   synced guest records are missing or corrupt on the host
     +-- LibvirtError                  libvirt, virsh or a domain's broker failed
     +-- ScenarioFileError             a user's scenario file is malformed: file, line, key
     +-- ScenarioDumpError (also TypeError)  a scenario holds a value TOML cannot write
     +-- ScenarioError (also ValueError)  a scenario or step is inconsistent, or none matches
     +-- ScenarioSetupError            a scenario cannot be prepared (image, copy, ...)
     +-- UnknownOperationError (also KeyError)  no comparison operation by that name
     +-- NoSuchPairError (also KeyError)  a scenario's result has no comparison of that pair
     +-- RegistryError (also RuntimeError)  a registry of parts is inconsistent (a bug)
     +-- StraceParseError (also ValueError)  a line of strace output could not be read
     +-- TraceRecordError (also ValueError)  an open record is impossible (no flags, bad result)
     +-- IotestsError                  QEMU's iotests cannot be set up or run here
     +-- BenchError                    the benchmark harness failed (not a slow figure)
     |    +-- ReplyError               a bench client's reply was no success with one fd
     |    +-- CBenchError              the compiled C benchmark failed or printed nonsense
     |    +-- BrokerBenchError         a benchmarked server or its client processes failed
     |    +-- SyscallTraceError        the broker's per-request syscalls could not be derived
     |    +-- BenchUsageError (also ValueError)  a harness function got impossible arguments
     |    +-- UnknownPartError (also KeyError)  no experiment, transport, server or ratio so named
     |    +-- PartKindError (also TypeError)  a registered module's PART is not what it must be
     +-- SuperviseError                the seccomp supervisor could not start or serve
          +-- KernelFeatureError       the kernel lacks seccomp notification or Landlock
          +-- TargetError              reading the trapped thread failed; ``errno`` is the answer
          +-- BPFProgramError (also ValueError)  a seccomp filter cannot be assembled or run
          +-- SuperviseArgumentError (also ValueError)  the supervisor was built with bad arguments
          +-- MeasureError (also RuntimeError)  a measurement helper printed no figure

The "(also X)" classes keep the built-in class the code raised before they
joined the tree, so a caller that caught ``ValueError`` still catches them.

Three exceptions stay outside on purpose: ``broker/gate.py``'s ``_Refused``
never leaves its module (control flow inside a path walk), nor does
``bench/pyfloor.py``'s ``_Eof`` (the floor's loop ending on a closed peer), and
``libvirt/emulator.py``'s ``EmulatorRefusal`` is in a file that must import
only the standard library (it runs as libvirt's emulator, without the venv).

Exceptions carry the data a caller needs to act on them, as attributes, and
chain their cause with ``raise ... from err``.  ``OSError`` is kept for what
really is an errno from an open (the broker's answer): code that already
handles ``open(2)`` failures handles the hook's too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.protocol.codec import FrameError


class TestbedError(Exception):
    """Root of every error the testbed raises on purpose."""

    __test__ = False  # not a pytest test class, despite the name


class ProtocolError(TestbedError):
    """Something about an -open-hook-fd frame is wrong."""


class LocalProtocolError(ProtocolError):
    """The caller asked the codec for something the protocol cannot express."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes (or descriptors) that the protocol forbids.

    ``frame`` holds the offending bytes when there are any (cut to 64).
    """

    def __init__(self, message: str, *, frame: bytes = b"") -> None:
        super().__init__(message)
        self.frame = frame[:64]


class FrameDecodeError(RemoteProtocolError):
    """A malformed frame from the peer. ``kind`` says which rule it broke."""

    def __init__(self, kind: FrameError, detail: str, *, frame: bytes = b"") -> None:
        super().__init__(f"{kind.value}: {detail}", frame=frame)
        self.kind = kind


class OpenFlagsError(ProtocolError, ValueError):
    """A textual open-flags spelling (``O_RDWR|O_CREAT``) names a flag we do not know.

    ``flag`` is the unknown part, ``text`` the whole spelling.
    """

    def __init__(self, flag: str, text: str) -> None:
        super().__init__(f"unknown open flag {flag!r} in {text!r}")
        self.flag = flag
        self.text = text


class TransportError(TestbedError):
    """The socket under the protocol failed: peer gone, fds lost, truncation."""


class PolicyError(TestbedError):
    """A broker policy (flags or TOML file) is invalid."""

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source


class AuditWriteError(TestbedError):
    """A record could not be written to the broker's audit log (full or failing disk).

    ``path`` is the log file, ``errno`` the write's error.  The request the
    record was for must not be granted: an unaudited open is not allowed.
    """

    def __init__(self, path: str, errno: int, message: str) -> None:
        super().__init__(f"audit log {path}: {message}")
        self.path = path
        self.errno = errno


class BrokerStateError(TestbedError, RuntimeError):
    """A broker was asked to do something its lifecycle state forbids (start twice).

    ``state`` is the state it was in.
    """

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(f"{message} (broker is {state})")
        self.state = state


class CorruptImageError(TestbedError):
    """An image's metadata contradicts itself or the file it lives in.

    The arguments are keyword-only; a format's ``HeaderLayout.corrupt``
    looks the offset up by field name.
    """

    def __init__(self, *, fmt: str, field: str, offset: int | None, message: str) -> None:
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{fmt}: corrupt {field}{where}: {message}")
        self.format = fmt
        self.field = field
        self.offset = offset


class BlockError(TestbedError):
    """The block-layer model cannot do what was asked (not an errno, not corruption)."""


class BlockUsageError(BlockError, ValueError):
    """The block-layer model was called with arguments it cannot take."""


class UnknownFormatError(BlockError, KeyError):
    """No format driver by that name. ``name`` is what was asked, ``known`` what exists."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"no format driver {name!r} in the model (known: {', '.join(known)})")
        self.name = name
        self.known = tuple(known)


class WaitTimeout(TestbedError, TimeoutError):
    """A wait ran out of time. ``what`` says what was being waited for."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"timed out after {timeout:g}s waiting for {what}")
        self.what = what
        self.timeout = timeout


class BuildError(TestbedError):
    """Building QEMU, the image corpus or the guest failed."""

    def __init__(self, message: str, *, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class MissingBuildError(BuildError):
    """A QEMU binary that was asked for (version, kind, program) is not built."""

    def __init__(self, message: str, *, version: str, kind: str, path: str) -> None:
        super().__init__(message)
        self.version = version
        self.kind = kind
        self.path = path


class QemuVersionError(TestbedError):
    """A QEMU version or binary kind that the registry (testbed.qemu.versions) does not know."""


class QEMUError(TestbedError):
    """A QEMU process misbehaved."""


class CommandLineError(TestbedError, ValueError):
    """A :class:`~testbed.qemu.commandline.MachineConfig` or image attachment that no
    QEMU command line can express (a bad accelerator, a hidden firmware directory,
    a ``-blockdev`` without its driver)."""


class LaunchError(QEMUError):
    """QEMU did not come up. Holds the command line, the exit code and the log."""

    def __init__(
        self, message: str, *, argv: Sequence[str], exitcode: int | None, log: str
    ) -> None:
        tail = "\n".join(log.rstrip().splitlines()[-20:])
        super().__init__(
            f"{message}\n  command: {' '.join(argv)}\n  exit code: {exitcode}\n  log:\n{tail}"
        )
        self.argv = list(argv)
        self.exitcode = exitcode
        self.log = log


class UnknownProgramError(QemuVersionError, ValueError):
    """No program by that name in a QEMU build (or not one of that kind). ``program`` is it."""

    def __init__(self, message: str, *, program: str) -> None:
        super().__init__(message)
        self.program = program


class QMPCommandError(QEMUError):
    """QEMU answered a QMP command with an error (``error_class``, ``desc``)."""

    def __init__(self, command: str, arguments: dict[str, Any], error_class: str, desc: str):
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc


class QEMUUsageError(QEMUError, ValueError):
    """The QEMU machine wrapper or its fixtures were called with arguments they cannot take."""


class GuestError(TestbedError):
    """The guest did not reach a step's success pattern (or hit its failure pattern)."""

    def __init__(self, step: str, message: str, *, console_tail: str = "") -> None:
        super().__init__(f"guest step {step!r}: {message}")
        self.step = step
        self.console_tail = console_tail


class GuestUsageError(TestbedError, ValueError):
    """Guest boot options that do not go together, a disk layout or record that cannot be,
    or a :class:`~testbed.guest.session.Session` configured or called in a way it cannot
    work (``supervise`` with the hook, a broker kill without a broker process).

    Raised before anything boots, so ``testbed boot`` reports it as a usage error.
    """


class VerifyError(TestbedError):
    """Synced records are missing, misplaced or corrupt in a snapshot chain."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("record verification failed:\n  " + "\n  ".join(problems))
        self.problems = list(problems)


class LibvirtError(TestbedError):
    """libvirt (a daemon, a ``virsh`` command, a domain's broker) did not do what was asked.

    ``argv`` and ``output`` hold the command and what it printed, when there was one.
    """

    def __init__(self, message: str, *, argv: Sequence[str] = (), output: str = "") -> None:
        super().__init__(message)
        self.argv = list(argv)
        self.output = output


class SuperviseError(TestbedError):
    """The seccomp supervisor could not start its command or serve it."""


class KernelFeatureError(SuperviseError):
    """The running kernel lacks something the supervisor needs; ``feature`` names it."""

    def __init__(self, message: str, *, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


class TargetError(SuperviseError):
    """Reading the caller failed in a way the open itself would: ``errno`` is its answer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = code
        self.reason = reason


class BPFProgramError(SuperviseError, ValueError):
    """A seccomp BPF program cannot be assembled (labels, jumps, size) or interpreted."""


class SuperviseArgumentError(SuperviseError, ValueError):
    """The supervisor was built with arguments it cannot work with."""


class MeasureError(SuperviseError, RuntimeError):
    """A measurement helper did not print the figure it was run for."""


class ScenarioFileError(TestbedError):
    """A scenario file (``testbed compare --scenario-file``) is malformed.

    ``path``, ``line`` (1-based, 0 when unknown) and ``key`` (dotted, e.g.
    ``scenario[2].steps[1].qmp``) say where; the message says what.
    """

    def __init__(self, path: str, line: int, key: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path = path
        self.line = line
        self.key = key


class ScenarioDumpError(TestbedError, TypeError):
    """A scenario cannot be written as a scenario file: ``value`` has no TOML spelling."""

    def __init__(self, value: object) -> None:
        super().__init__(f"cannot write {value!r} as TOML")
        self.value = value


class ScenarioError(TestbedError, ValueError):
    """A comparison scenario or step is inconsistent, or no scenario matches a pattern."""


class ScenarioSetupError(TestbedError):
    """A scenario cannot be prepared: image missing from the index, copy failed, ..."""


class UnknownOperationError(TestbedError, KeyError):
    """No comparison operation by that name. ``name`` is what was asked."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown operation {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = tuple(known)


class NoSuchPairError(TestbedError, KeyError):
    """A scenario's result holds no comparison of (``left``, ``right``); ``known`` what it has."""

    def __init__(self, left: str, right: str, known: Sequence[tuple[str, str]]) -> None:
        have = ", ".join(f"{a}-{b}" for a, b in known) or "none"
        super().__init__(f"no comparison of {left} with {right} (compared: {have})")
        self.left = left
        self.right = right
        self.known = tuple(known)


class RegistryError(TestbedError, RuntimeError):
    """A registry of parts is inconsistent (registered twice, missing a module): a bug."""


class StraceParseError(TestbedError, ValueError):
    """An open line of the strace output could not be read (the message names the line)."""


class TraceRecordError(TestbedError, ValueError):
    """An open record is impossible: no flags at all, or a result that is no errno."""


class IotestsError(TestbedError):
    """QEMU's own iotests cannot be set up or run (source tree, tools, layout)."""


class BenchError(TestbedError):
    """The benchmark's harness failed: a measurement could not be taken (never "too slow")."""


class ReplyError(BenchError):
    """A bench client's reply from the broker was not a success carrying exactly one fd."""


class CBenchError(BenchError):
    """The compiled C benchmark (``c_limit.c``) failed or printed something unexpected."""


class BrokerBenchError(BenchError):
    """A benchmarked server (broker, floor, C server, supervisor) or a client failed in a run."""


class SyscallTraceError(BenchError):
    """An strace could not be turned into a per-request program the Python floor can run."""


class BenchUsageError(BenchError, ValueError):
    """A harness function was called with arguments it cannot take (no samples, 0 reps)."""


class UnknownPartError(BenchError, KeyError):
    """No benchmark part (experiment, transport, server, ratio) by that name; says the known."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument: keep the plain message
        return str(self.args[0]) if self.args else ""


class PartKindError(BenchError, TypeError):
    """A registered module's ``PART`` has the wrong type or name (a bug in the registration)."""
