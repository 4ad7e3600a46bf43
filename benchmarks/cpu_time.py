"""CPU time accounting for the benchmarks: this process's and another process's
CPU seconds, and how much of the machine other processes used meanwhile (a
noisy-neighbour meter, so that a figure taken under load says so)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

CORES = os.cpu_count() or 1


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of another process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Share of the machine's CPU time used by other processes since creation
    (Linux /proc/stat minus this process's own CPU time): a noisy-neighbour meter."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        own = os.times()
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        total = sum(v) / hz
        return busy, total, own.user + own.system, v[7] / hz

    def share(self) -> dict | None:
        end = self._sample()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        busy, total, own, steal = (e - s for e, s in zip(end, self.start, strict=True))
        return {"other": max(0.0, (busy - own) / total), "steal": steal / total}
