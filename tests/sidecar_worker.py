"""A sidecar replica in its own process, over the tiny seeded Llama (used by kill -9 tests).

    python tests/sidecar_worker.py --transport URL --stream S --consumer C --audit DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def fail_fsync_while(flag: str) -> None:
    """Fault injection for tests: ``fdatasync`` fails with EIO while the file ``flag`` exists (what
    a disk that loses writes, or a thin volume that runs out of space, does to an fsync)."""
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if os.path.exists(flag):
            raise OSError(5, "Input/output error (injected)")
        real(fd)

    os.fdatasync = fdatasync


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--consumer", required=True)
    ap.add_argument("--audit", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--claim-idle-ms", type=int, default=600)
    ap.add_argument("--batch-max", type=int, default=8)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--max-deliveries", type=int, default=5)
    ap.add_argument("--crash-on-request-id", default=None,
                    help="die (os._exit) when a batch holds a sample with this request id: a message "
                         "that kills its replica, as a crash in native code would")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("LW_TEST_FSYNC_FAILS_WHILE"):
        fail_fsync_while(os.environ["LW_TEST_FSYNC_FAILS_WHILE"])
    from conftest import make_tiny

    from monitor.lenses.torch_lens import TorchLogitLens
    from monitor.sidecar.config import load_settings
    from monitor.sidecar.http import SidecarHTTPServer
    from monitor.sidecar.service import Sidecar

    model = make_tiny("llama", seed=args.seed)
    settings = load_settings(
        transport=args.transport, stream=args.stream, consumer=args.consumer, group="g",
        claim_idle_ms=args.claim_idle_ms, claim_interval_s=0.2, batch_max=args.batch_max, batch_wait_ms=20,
        http_port=args.http_port, stats_interval_s=0.5, shutdown_timeout_s=10, max_deliveries=args.max_deliveries,
        audit={"directory": args.audit}, baseline={"learn_samples": 100_000},
    )
    sidecar = Sidecar(settings, bank=TorchLogitLens(model))
    if args.crash_on_request_id is not None:
        import monitor.sidecar.batch as batch

        real = batch.read_samples

        def read_samples(bank, samples, index):  # noqa: ANN001, ANN202
            if any(s.request_id == args.crash_on_request_id for s in samples):
                os._exit(3)
            return real(bank, samples, index)

        batch.read_samples = read_samples
    http = SidecarHTTPServer(sidecar, "127.0.0.1", args.http_port).start()
    print(f"READY {http.port}", flush=True)
    sidecar.install_signal_handlers()
    sidecar.run()
    http.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
