#!/usr/bin/env python3
"""What a benchmark run cost, for benches/compare.sh: snapshots of counters,
and the difference of two snapshots per pair.

  usage.py snapshot POSTMASTER_PID IDEMD_PID PSQL...   prints one JSON line
  usage.py per-pair BEFORE END AFTER PAIRS             prints the costs

BEFORE is taken before the load, END as it stops (CPU is read from it) and
AFTER once every backend has reported its statistics (Postgres sends a busy
backend's counters at most every second and an idle one's within ten; the
commits and WAL figures are read from it). The costs printed: Postgres CPU
µs, idemd CPU µs, commits, WAL syncs and WAL bytes, each per pair.

CPU comes from /proc: every Postgres process is the postmaster (its own
time plus what it collected from children that exited, so a backend that
ends during the run is still counted) and its live children; idemd is its
own process (0 when absent). Commits are pg_stat_database.xact_commit of
the current database, WAL syncs pg_stat_wal.wal_sync: both cover every
client of the database, so nothing else should run against it meanwhile.
"""
import json
import os
import subprocess
import sys

TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    """The fields after the command name of /proc/PID/stat, or None."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(fields, with_children):
    # utime, stime, cutime, cstime are fields 14-17 of stat(5): 11-14 here.
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + stime + ((cutime + cstime) if with_children else 0)) / TICKS


def postgres_cpu(postmaster):
    fields = stat_fields(postmaster)
    if fields is None:
        sys.exit(f"usage.py: no process {postmaster} (the postmaster)")
    total = cpu_seconds(fields, with_children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = stat_fields(entry)
            if child is not None and int(child[1]) == postmaster:
                total += cpu_seconds(child, with_children=False)
    return total


def snapshot(postmaster, idemd, psql):
    query = ("SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), "
             "(SELECT wal_sync FROM pg_stat_wal), (SELECT wal_bytes FROM pg_stat_wal)")
    # CPU first: the query's own backend must not count.
    cpu = postgres_cpu(postmaster)
    idemd_fields = stat_fields(idemd) if idemd else None
    commits, syncs, wal_bytes = subprocess.run([*psql, "-Atc", query], check=True, capture_output=True,
                                               text=True).stdout.strip().split("|")
    return {"postgres_cpu": cpu, "idemd_cpu": cpu_seconds(idemd_fields, False) if idemd_fields else 0.0,
            "commits": int(commits), "wal_syncs": int(syncs), "wal_bytes": int(float(wal_bytes))}


def per_pair(before, end, after, pairs):
    if pairs <= 0:
        return "no pairs"
    diff = {name: (end if name.endswith("_cpu") else after)[name] - before[name] for name in before}
    return (f"{diff['postgres_cpu'] / pairs * 1e6:.0f} {diff['idemd_cpu'] / pairs * 1e6:.0f} "
            f"{diff['commits'] / pairs:.2f} {diff['wal_syncs'] / pairs:.3f} {diff['wal_bytes'] / pairs:.0f}")


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "snapshot":
        print(json.dumps(snapshot(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])))
    elif len(sys.argv) == 6 and sys.argv[1] == "per-pair":
        before, end, after = (json.loads(text) for text in sys.argv[2:5])
        print(per_pair(before, end, after, float(sys.argv[5])))
    else:
        sys.exit(__doc__)
