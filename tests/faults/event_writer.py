"""An event writer to kill: `python event_writer.py DIR RUN_ID SHARD [--tear-after N] [--label L]`.

Emits `progress` events with `seq` 0, 1, 2 ... as fast as it can and prints each `seq` on stdout
once `emit` has returned (an acknowledgement: that event is complete). With `--tear-after N`, the
event after the N-th is written only halfway and the process kills itself with SIGKILL, the way a
write cut short (full disk, power loss) leaves a file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("run_id")
    parser.add_argument("shard")
    parser.add_argument("--tear-after", type=int, default=None)
    parser.add_argument("--label", default="w")
    parser.add_argument("--limit", type=int, default=10**9)
    args = parser.parse_args()

    from attnfallback.events import EventSink

    sink = EventSink(args.directory, run_id=args.run_id, shard=args.shard, fsync=False)
    out = sys.stdout
    for seq in range(args.limit):
        if args.tear_after is not None and seq == args.tear_after:
            real_write = os.write

            def half_then_die(fd, data):
                real_write(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

            os.write = half_then_die
        sink.emit("progress", seq=seq, writer=args.label, padding="x" * (seq % 200))
        out.write(f"{seq}\n")
        out.flush()


if __name__ == "__main__":
    main()
