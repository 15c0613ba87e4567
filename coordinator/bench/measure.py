"""Reading other processes from outside: CPU time from /proc, store commits, fsyncs by strace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second, the unit of /proc/PID/stat's CPU times."""

TRANSACTIONS = "saga_store_transactions_total"
WRITES = "saga_store_writes_total"


def parse_stat_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/PID/stat.

    The second field (the command name, in parentheses) may itself hold spaces and
    parentheses, so fields are counted from the last ``)``: utime and stime are fields 14 and
    15 of the line, the 12th and 13th after it.
    """
    fields = stat[stat.rindex(")") + 1 :].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds (user + system, every thread) a live process has used so far."""
    return parse_stat_ticks((proc / str(pid) / "stat").read_text()) / CLOCK_TICKS


def parse_reaped_ticks(stat: str) -> int:
    """cutime + cstime, in clock ticks: the CPU of the children a process has waited for."""
    fields = stat[stat.rindex(")") + 1 :].split()
    return int(fields[13]) + int(fields[14])


def server_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds a server and its children have used so far: a server like PostgreSQL's,
    whose work is done in children it forks (one per connection) and reaps when they end.

    The children that ended count through the server's reaped-children times; those still
    running, by their own. A child that ends between the two readings may count twice or not
    at all: a connection that closes while the bench measures is rare.
    """
    stat = (proc / str(pid) / "stat").read_text()
    ticks = parse_stat_ticks(stat) + parse_reaped_ticks(stat)
    for child in children(pid, proc):
        try:
            ticks += parse_stat_ticks((proc / str(child) / "stat").read_text())
        except OSError:  # it ended meanwhile
            continue
    return ticks / CLOCK_TICKS


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The pids of a process's children (from /proc/PID/task/*/children, else by ppid)."""
    found: list[int] = []
    listed = False
    for task in (proc / str(pid) / "task").glob("*/children"):
        listed = True
        found.extend(int(child) for child in task.read_text().split())
    if listed:
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        if int(stat[stat.rindex(")") + 1 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(?P<value>\S+)")


def command_line(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """A process's arguments ([] when it has ended)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def scrape(url: str, names: tuple[str, ...] = (TRANSACTIONS, WRITES)) -> dict[str, float]:
    """The named samples of a Prometheus text endpoint, summed over their labels."""
    import urllib.request  # only the orchestrator scrapes; the coordinator imports this module

    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        sample = _SAMPLE.match(line)
        if sample is not None and sample["name"] in names:
            totals[sample["name"]] = totals.get(sample["name"], 0.0) + float(sample["value"])
    return totals


_SYNC_CALL = re.compile(rb"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(?:fsync|fdatasync)\(", re.MULTILINE)


def count_syncs(trace: bytes) -> int:
    """fsync and fdatasync calls in strace output (a call split by another thread counts once)."""
    return len(_SYNC_CALL.findall(trace))


@dataclass(frozen=True)
class Strace:
    """How to run a command under strace to count its fsyncs, when strace works here."""

    options: tuple[str, ...]

    @property
    def label(self) -> str:
        """How the fsyncs were counted, for the report."""
        return "strace --seccomp-bpf" if "--seccomp-bpf" in self.options else "strace"

    def wrap(self, command: list[str], output: Path) -> list[str]:
        """``command`` under strace, writing its fsyncs and fdatasyncs to ``output``."""
        return ["strace", *self.options, "-o", str(output), *command]

    @classmethod
    def find(cls) -> Strace | None:
        """strace with --seccomp-bpf, else plain, else None (then fsyncs are unknown)."""
        if shutil.which("strace") is None:
            return None
        base = ("-f", "-qq", "-e", "trace=fsync,fdatasync", "-e", "signal=none")
        for options in (("--seccomp-bpf", *base), base):
            try:
                probe = subprocess.run(
                    ["strace", *options, "-o", os.devnull, "true"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0:
                return cls(options)
        return None
