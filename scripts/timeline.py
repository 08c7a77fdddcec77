#!/usr/bin/env python3
"""One timeline of the teleforks of a run, from the stamps every process prints with
TELEFORK_DEBUG=1 (`XT <µs since boot> <pid> <step>`, engine::timeline::stamp).

On the testbed all nodes share one machine, hence one clock: start the testbed with
TELEFORK_DEBUG=1 in its environment, run the program with it too (stderr to a file), then

    python3 scripts/timeline.py program.err /run/telefork-testbed/node*/daemon.log

prints, for each step, its median time after the program's `telefork` call over all the
teleforks of the run (the n-th occurrence of a step within one telefork is `step#n`), and
with --each, every telefork's steps in order. Each stamp is counted to the program's last
`telefork` call before it: runs with one telefork at a time only (not fan-outs, background
teleforks or several programs at once).
"""
import statistics
import sys
from collections import Counter, defaultdict


def stamps(paths):
    out = []
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.split(None, 3)
                # (lines of two processes may interleave in one log: keep whole stamps only)
                if len(parts) == 4 and parts[0] == "XT" and parts[1].isdigit() and parts[2].isdigit():
                    out.append((int(parts[1]), parts[2], parts[3].strip()))
    return sorted(out)


def main():
    args = [a for a in sys.argv[1:] if a != "--each"]
    if not args:
        sys.exit(__doc__)
    teleforks = []  # each: [(µs after the call, pid, step)]
    for t, pid, step in stamps(args):
        if step == "lib call":
            teleforks.append((t, []))
        elif teleforks:
            teleforks[-1][1].append((t - teleforks[-1][0], pid, step))
    if not teleforks:
        sys.exit("no `lib call` stamps: was the program run with TELEFORK_DEBUG=1?")
    after = defaultdict(list)
    for n, (_, steps) in enumerate(teleforks):
        seen = Counter()
        if "--each" in sys.argv:
            print(f"telefork {n}")
        for dt, pid, step in steps:
            seen[step] += 1
            key = step if seen[step] == 1 else f"{step}#{seen[step]}"
            after[key].append(dt)
            if "--each" in sys.argv:
                print(f"  {dt:8d} µs  {pid:>7}  {step}")
    print(f"{len(teleforks)} teleforks; median µs after the call (steps seen in at least half of them):")
    for key, times in sorted(after.items(), key=lambda kv: statistics.median(kv[1])):
        if 2 * len(times) >= len(teleforks):
            print(f"  {statistics.median(times):8.0f}  {key}  (n={len(times)})")


if __name__ == "__main__":
    main()
