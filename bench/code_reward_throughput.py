"""Programs per second of CodeReward (sandbox start, tests, clean-up) on this machine.

    python -m bench.code_reward_throughput --programs 64 --workers 2

Each program is a short passing solution with three assert tests; the load average is printed with the result
because the machine may be shared.
"""

import argparse
import os
import time

from sdpo_ops.rewards import CodeReward

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    reward = CodeReward(max_workers=args.workers)
    reward([SOLUTION], tests=[TESTS])  # warm the page cache
    start = time.perf_counter()
    result = reward([SOLUTION] * args.programs, tests=[TESTS] * args.programs)
    elapsed = time.perf_counter() - start
    assert result.scores == [1.0] * args.programs
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"{args.programs} programs, {args.workers} workers, {os.cpu_count()} CPUs: {elapsed:.2f} s, "
        f"{args.programs / elapsed:.1f} programs/s (load average {load})"
    )


if __name__ == "__main__":
    main()
