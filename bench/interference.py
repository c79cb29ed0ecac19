"""How much CPU other work on the machine took while a benchmark measured: a /proc sampler (Linux).

Other processes = everything but this process and its descendants (the benchmark's redis-server, gateway and
worker are its children). Their CPU is the machine's busy time (/proc/stat) minus this process tree's (utime, stime
and the reaped children's cutime, cstime, so a pool child that exits keeps counting through its parent). A figure
well above 0 means the two sides of a comparison did not run on equally idle cores.
"""

from __future__ import annotations

import os
import threading
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and its reaped children)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        found[int(entry)] = (int(fields[1]), sum(int(value) for value in fields[11:15]) / _TICKS)
    return found


def _own_tree_seconds(root: int) -> float:
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += processes.get(pid, (0, 0.0))[1]
        stack.extend(children.get(pid, []))
    return total


class OtherProcessesCpu:
    """A daemon thread sampling, every `interval_s`, the CPU seconds taken by processes outside this tree."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (wall-clock time, cumulative other-process CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="other-cpu", daemon=True)
        self._start_busy = self._start_own = 0.0

    def __enter__(self) -> OtherProcessesCpu:
        self._start_busy, self._start_own = _machine_busy_seconds(), _own_tree_seconds(os.getpid())
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy, own = _machine_busy_seconds(), _own_tree_seconds(os.getpid())
            self.samples.append((time.time(), (busy - self._start_busy) - (own - self._start_own)))
            self._stop.wait(self.interval_s)

    def cores_between(self, start: float, end: float) -> float:
        """Average number of cores other processes used between two wall-clock times (nan without samples)."""
        inside = [(moment, seconds) for moment, seconds in self.samples if start <= moment <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return float("nan")
        # Clamped at 0: the two clocks are read a moment apart, so an idle machine can read a few hundredths below.
        return max(0.0, (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]))


def _steal_and_total_ticks() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (fields + [0] * 8)[7], sum(fields[:8])


class StolenCpu:
    """The share of all cores' time the hypervisor gave to other guests ("steal") since start(): a virtual machine
    cannot see who else shares its host, and a benchmark run while a fifth of the time is stolen is not comparable
    with one run while none is."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._steal, self._total = _steal_and_total_ticks()

    def fraction(self) -> float:
        steal, total = _steal_and_total_ticks()
        elapsed = total - self._total
        return (steal - self._steal) / elapsed if elapsed > 0 else 0.0
