"""Per-file test durations from a pytest run with ``--durations=0``, as a markdown table.

    python -m pytest -q -n 2 --dist worksteal --durations=0 > run.log
    python .ci/durations.py run.log > docs/test-durations.md

Several logs (the fast tier, then the slow one) add up: ``durations.py fast.log slow.log``.

Times are summed over each file's setups, calls and teardowns (worker seconds: with two
workers the wall time is about half the total).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

LINE = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+(\S+?)::")
SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+, )*\d+ \w+.* in [0-9.]+s.*?)\s*=*$")


def main(paths: list[str]) -> None:
    """Prints the table of the runs logged at ``paths``."""
    seconds: dict[str, float] = defaultdict(float)
    tests: dict[str, set[str]] = defaultdict(set)
    summaries = []
    for path in paths:
        with open(path) as log:
            for line in log:
                if m := LINE.match(line):
                    seconds[m.group(3)] += float(m.group(1))
                    tests[m.group(3)].add(line.split()[-1])
                elif m := SUMMARY.match(line.strip()):
                    summaries.append(m.group(1))
    total = sum(seconds.values())
    print("# Where the test suite's time goes\n")
    print("For whoever makes the suite faster or splits its tiers. Written by `.ci/durations.py` from a")
    print("run of the suite with `--durations=0` (`-n 2 --dist worksteal`, 2 cores, CI=1).\n")
    for path, summary in zip(paths, summaries, strict=False):
        print(f"- `{path.rsplit('/', 1)[-1]}`: {summary}")
    print(f"\nWorker seconds in all: {total:.0f}.\n")
    print("| file | tests timed | seconds | share |")
    print("|---|---:|---:|---:|")
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| `{name}` | {len(tests[name])} | {value:.1f} | {100 * value / total:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
