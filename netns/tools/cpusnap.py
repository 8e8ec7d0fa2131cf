#!/usr/bin/env python3
"""CPU time per process over a measurement, for the benchmarks.

  cpusnap.py snap FILE              record every process's CPU time and the
                                    machine's (/proc/stat) into FILE
  cpusnap.py diff BEFORE AFTER N    print, per network namespace and command,
                                    the CPU microseconds spent between the two
                                    snapshots per unit of work (N: requests),
                                    then the machine's idle and softirq share

Processes are named by the lab namespace they run in (from /run/netns) and
their command. Times come from /proc/PID/stat (utime + stime of all the
process's threads, the user share in brackets), in clock ticks.
"""
import json
import os
import sys

TICK = os.sysconf("SC_CLK_TCK")


def netns_names():
    names = {}
    try:
        for n in os.listdir("/run/netns"):
            try:
                names[os.stat(os.path.join("/run/netns", n)).st_ino] = n
            except OSError:
                pass
    except OSError:
        pass
    return names


def snap(path):
    names = netns_names()
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
            comm = s[s.index("(") + 1 : s.rindex(")")]
            fields = s[s.rindex(")") + 2 :].split()
            ticks = [int(fields[11]), int(fields[12])]
            try:
                ino = os.stat(f"/proc/{pid}/ns/net").st_ino
                ns = names.get(ino, "-")
            except OSError:
                ns = "-"
        except (OSError, ValueError, IndexError):
            continue
        procs[pid] = [ns, comm, ticks]
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    with open(path, "w") as f:
        json.dump({"procs": procs, "cpu": cpu}, f)


def short(ns):
    # lab namespaces are gwlab-RUN-SHORT: keep SHORT
    return ns.rsplit("-", 1)[-1] if ns.startswith("gw") else ns


def diff(a_path, b_path, n):
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    groups = {}
    for pid, (ns, comm, t) in b["procs"].items():
        t0 = a["procs"].get(pid, [ns, comm, [0, 0]])[2]
        du, ds = t[0] - t0[0], t[1] - t0[1]
        if du + ds <= 0:
            continue
        key = f"{short(ns)}/{comm}"
        g = groups.setdefault(key, [0, 0])
        g[0] += du
        g[1] += ds
    cpu = [y - x for x, y in zip(a["cpu"], b["cpu"])]
    total = sum(cpu[:8]) or 1
    us = lambda ticks: ticks / TICK * 1e6 / max(n, 1)
    parts = [
        f"{k} {us(u + s):.1f} ({us(u):.1f} user)"
        for k, (u, s) in sorted(groups.items(), key=lambda kv: -sum(kv[1]))
        if us(u + s) >= 0.5
    ]
    busy = total - cpu[3] - cpu[4]
    print(
        f"CPU µs per request: {', '.join(parts)}; machine busy {us(busy):.1f} "
        f"(softirq {us(cpu[6]):.1f}), idle {100 * (cpu[3] + cpu[4]) / total:.0f}%"
    )


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "snap":
        snap(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3], int(float(sys.argv[4])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
