"""One client against each ping-pong server, under each CPU placement, interleaved.

Every registered server (:data:`testbed.bench.servers.SERVERS`) is started
once per placement and kept; then each repetition runs one round of every
(placement, server) in turn.  ``broker_cpu_vs_python_floor`` pairs the
broker's and the floor's server CPU per request of the same repetition,
both pinned with their client to one core.  The ``seccomp_open_vs_*``
ratios divide the supervised C child's time per ``openat`` + ``close`` by
``c_floor``'s (the same child unsupervised), ``open_hook_server``'s and the
broker's time per round trip, all on one core.  The unpinned broker rounds are
not reused elsewhere: :mod:`.handover` interleaves its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from testbed.bench.experiments import Context, Experiment
from testbed.bench.interleave import interleave
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.results import Outcome, Row, figures_of, server_cpu_us
from testbed.bench.servers import SERVERS, Session
from testbed.bench.stats import RunFigures, paired_ratios

NAME = "pingpong"
#: ratio key -> the server whose time per open divides the supervised child's
SECCOMP = {
    "seccomp_open_vs_plain": "c_floor",
    "seccomp_open_vs_hook_c": "open_hook_server",
    "seccomp_open_vs_hook": "broker",
}
KEYS = ("broker_cpu_vs_python_floor", *SECCOMP)


def placements() -> list[Placement]:
    usable = os.sched_getaffinity(0)
    return [p for p in Placement if p is not Placement.CROSS_CORE or len(usable) >= 2]


def round_of(session: Session, seconds: float) -> Callable[[int], RunFigures]:
    def arm(_rep: int) -> RunFigures:
        return session.round(seconds)

    return arm


def run(ctx: Context) -> Outcome:
    out = Outcome()
    servers = list(SERVERS)
    arms: dict[str, Callable[[int], RunFigures]] = {}
    sessions: list[Session] = []
    with contextlib.ExitStack() as stack:
        for p in placements():
            for server in servers:
                if server.placements is not None and p not in server.placements:
                    continue
                why = server.unavailable(ctx.env)
                if why:
                    out.rows.append(Row(experiment=NAME, transport=server.name,
                                        setting=p.value, skipped=why))  # fmt: skip
                    continue
                ctx.log(f"pingpong: starting {server.name} ({p.value})")
                session = server.open(ctx.env, cpus_for(p))
                stack.callback(session.close)
                sessions.append(session)
                arms[f"{server.name}@{p.value}"] = round_of(session, ctx.plan.seconds)
        runs = interleave(ctx.plan.reps, arms, log=ctx.log, label="pingpong")
    for key, figures in runs.items():
        name, _, setting = key.partition("@")
        out.rows.append(Row(experiment=NAME, transport=name, setting=setting,
                            figures=figures_of(figures)))  # fmt: skip
    same = Placement.SAME_CORE.value
    broker, floor = runs.get(f"broker@{same}"), runs.get(f"python_floor@{same}")
    key = "broker_cpu_vs_python_floor"
    if broker and floor:
        out.ratios[key] = paired_ratios(server_cpu_us(broker), server_cpu_us(floor))
    else:
        out.missing[key] = "the broker or the Python floor did not run on one core"
    seccomp = runs.get(f"seccomp@{same}")
    for key, other in SECCOMP.items():
        them = runs.get(f"{other}@{same}")
        if seccomp and them:
            # time per op is 1 / ops_per_s: seccomp's over theirs
            out.ratios[key] = paired_ratios([r.ops_per_s for r in them],
                                            [r.ops_per_s for r in seccomp])  # fmt: skip
        else:
            out.missing[key] = f"seccomp or {other} did not run on one core"
    return out


PART = Experiment(name=NAME, run=run, keys=KEYS)
