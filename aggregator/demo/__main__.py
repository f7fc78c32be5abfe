"""Command line entry point, so `python -m aggregator.demo` runs the upstreams in a subprocess."""

from __future__ import annotations

import argparse

from aggregator.demo.knobs import Knobs
from aggregator.demo.server import run_demo


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m aggregator.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=8101, help="port to bind (0 picks one)")
    parser.add_argument("--latency", type=float, default=0.1, help="default delay in seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra random delay, 0..N s")
    parser.add_argument("--failure-rate", type=float, default=0.0, help="chance of a 503, 0..1")
    parser.add_argument(
        "--stall-rate", type=float, default=0.0, help="chance of no answer until the caller quits"
    )
    parser.add_argument(
        "--payload-kb",
        type=float,
        default=0.0,
        help="KB of JSON per answer, grown in lists the models keep (0: the small payloads)",
    )
    args = parser.parse_args(argv)
    try:
        knobs = Knobs(
            latency=args.latency,
            jitter=args.jitter,
            failure_rate=args.failure_rate,
            stall_rate=args.stall_rate,
            payload_kb=args.payload_kb,
        )
    except ValueError as exc:
        parser.error(str(exc))
    run_demo(args.host, args.port, knobs)


if __name__ == "__main__":
    main()
