"""python -m cloud.rehearsal serve --dir D: a rehearsal cloud in the
foreground until SIGTERM (or Ctrl-C), which ends every process it started.

    python -m cloud.rehearsal serve --dir D [--fault NAME]... \\
        [--preempt-after-epoch K --checkpoint-dir DIR] [--capacity-after S]

It writes D/env.sh, the variables gcloud and the tool need to talk to it
(`submit --rehearse-cloud D` reads it; in a shell, `(. D/env.sh && gcloud
...)`), and appends every request it serves to D/requests.jsonl.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from cloud.rehearsal.api import Clock
from cloud.rehearsal.cloud import FAULTS, Cloud


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.rehearsal",
        description="A loopback Cloud TPU for rehearsals with the real gcloud.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run a rehearsal cloud until SIGTERM")
    p.add_argument(
        "--dir", required=True, help="its directory (env.sh, requests.jsonl)"
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        choices=sorted(FAULTS),
        help="inject into every slice (repeatable)",
    )
    p.add_argument("--preempt-after-epoch", type=int, help="for preempt-sigterm")
    p.add_argument("--checkpoint-dir", help="for preempt-sigterm: where epochs land")
    p.add_argument(
        "--capacity-after",
        type=float,
        default=Clock.capacity_s,
        help="seconds a queued resource waits for resources (default %(default)s)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    clock = Clock(capacity_s=args.capacity_after)
    cloud = Cloud(
        args.dir, args.fault, args.preempt_after_epoch, args.checkpoint_dir, clock
    )
    try:
        cloud.start()
    except (ValueError, OSError) as error:
        print(f"python -m cloud.rehearsal: error: {error}", file=sys.stderr)
        return 2
    try:
        print(
            f"rehearsal cloud ready: {cloud.root}/env.sh", file=sys.stderr, flush=True
        )
        stop.wait()
    finally:
        cloud.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
