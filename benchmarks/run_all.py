"""``make bench``: run every benchmark in turn (each prints its table and writes JSON to bench-results/).

    python -m benchmarks.run_all [--only NAME ...]

Benchmarks are not CI gates. Run them on a quiet machine: several take minutes and their
latency ratios are meaningless while other jobs share the cores.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = ("tap_overhead", "lens_throughput", "lens_training", "drift_eval", "sidecar_load", "hostile_producer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    args = ap.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"\n######## benchmarks.{name}", flush=True)
        t0 = time.monotonic()
        try:
            rc = importlib.import_module(f"benchmarks.{name}").main([])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        print(f"######## benchmarks.{name}: rc={rc} in {time.monotonic() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
