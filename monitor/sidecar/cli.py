"""``layerwatch sidecar``: run one sidecar replica until SIGTERM."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("sidecar", help="consume samples, explain every layer, score, audit, serve /metrics",
                       description="Run one sidecar replica. Configuration: LAYERWATCH_* environment "
                                   "variables and an optional YAML file (see README).")
    p.add_argument("--config", help="YAML configuration file (environment variables override it)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print it (without secrets) and exit")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from monitor.sidecar.config import load_settings

    settings = load_settings(args.config)
    if args.check_config:
        print(json.dumps(settings.redacted(), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from monitor.sidecar.bootstrap import build_parts
    from monitor.sidecar.http import SidecarHTTPServer
    from monitor.sidecar.service import Sidecar

    sidecar = Sidecar(build_parts(settings))
    http = SidecarHTTPServer(sidecar, settings.http_host, settings.http_port).start()
    logging.getLogger("layerwatch.sidecar").info(
        "sidecar %s reading %s (group %s); http on :%d; lens provider %s",
        settings.consumer, settings.stream, settings.group, http.port, sidecar.bank.provider)
    sidecar.install_signal_handlers()
    try:
        sidecar.run()  # returns after SIGTERM: batch finished, audit flushed, acked
    finally:
        http.close()
    return 0
