"""Readings of other processes: CPU time from /proc, fsyncs from strace's output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from coordinator.bench.measure import (
    CLOCK_TICKS,
    children,
    command_line,
    count_syncs,
    cpu_seconds,
    parse_reaped_ticks,
    parse_stat_ticks,
    server_cpu_seconds,
)


def test_utime_and_stime_are_read_after_a_command_name_with_spaces_and_parentheses() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 900 0 3 0 1234 567 8 9 20 0 3 0\n"
    assert parse_stat_ticks(stat) == 1234 + 567


def test_the_cpu_of_reaped_children_is_read_after_the_process_own() -> None:
    # ... utime stime cutime cstime
    stat = "4242 (postgres) S 1 4242 4242 0 -1 4194560 900 0 3 0 1234 567 80 9 20 0 3 0\n"
    assert parse_reaped_ticks(stat) == 80 + 9


_BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
_SERVER = f"""
import subprocess, sys
burn = {_BURN!r}
subprocess.run([sys.executable, "-c", burn], check=True)
stays = burn + "print('burnt', flush=True)\\nimport sys\\nsys.stdin.read()\\n"
child = subprocess.Popen(
    [sys.executable, "-c", stays], stdin=subprocess.PIPE, stdout=subprocess.PIPE
)
child.stdout.readline()
print("ready", flush=True)
sys.stdin.read()
child.communicate(b"")
"""


def test_a_server_s_cpu_includes_its_children_running_and_ended() -> None:
    # The "server" runs a child that burns 0.3 s and ends, then one that burns 0.3 s and
    # stays: both count, as a PostgreSQL server's ended and open connections do.
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"ready\n"
        used = server_cpu_seconds(server.pid)
        own = cpu_seconds(server.pid)
    finally:
        server.communicate(b"")
    assert used >= own + 0.6 - 2 / CLOCK_TICKS


def test_the_cpu_time_of_a_live_process_is_read_from_proc(tmp_path: Path) -> None:
    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "end = time.process_time() + 0.4\n"
            "while time.process_time() < end: pass\n"
            "print('burnt', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert burner.stdout is not None
        assert burner.stdout.readline() == b"burnt\n"
        used = cpu_seconds(burner.pid)
        assert burner.pid in children(os.getpid())
        assert command_line(burner.pid)[:2] == [sys.executable, "-c"]
    finally:
        burner.communicate(b"")
    # Start-up costs some CPU too; the busy loop at least 0.4 s, measured by the child itself.
    assert 0.4 - 1 / CLOCK_TICKS <= used < 5


def test_the_cpu_time_read_from_proc_matches_what_the_process_counts_itself() -> None:
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    times = os.times()
    read = cpu_seconds(os.getpid())
    assert abs(read - (times.user + times.system)) <= 2 / CLOCK_TICKS + 0.02


def test_fsyncs_are_counted_once_also_when_strace_splits_a_call() -> None:
    trace = (
        b"4222  fsync(3)                          = 0\n"
        b"4263  fdatasync(7 <unfinished ...>\n"
        b"4222  fsync(3 <unfinished ...>\n"
        b"4263  <... fdatasync resumed>)          = 0\n"
        b"4222  <... fsync resumed>)              = 0\n"
        b"[pid  4300] fdatasync(9)                = 0\n"
        b"fsync(4)                                = 0\n"
    )
    assert count_syncs(trace) == 5
