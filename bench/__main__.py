"""Run benchmarks: ``python -m bench`` runs all, ``python -m bench NAME ...`` some."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["rpc_overhead", "identity_online", "identity_rebuild", "events_capture", "audiences", "delivery",
              "cohorts"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    for name in names:
        importlib.import_module(f"bench.{name}").run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
