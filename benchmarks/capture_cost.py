"""What wrapping an attempt costs in the worker: output capture plus the process-state reset.

Times, in a fresh process, what ``_worker.main`` adds around each attempt
(``Capture.start`` + ``Capture.stop``, which restores the process state):
for an attempt that prints nothing, one that prints one line, and one that
logs one record. Prints one JSON line of CPU microseconds per attempt (the
thread's CPU clock, so that load from other programs does not count; median
of ``--reps`` rounds of ``--n`` attempts; a printed line also costs the reader
thread's time, not counted here).

    python benchmarks/capture_cost.py --n 20000 --reps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="attempts per round")
    parser.add_argument("--reps", type=int, default=5, help="rounds; the median is reported")
    args = parser.parse_args()

    from wfaas.capture import Capture, ProcessState, format_record

    capture = Capture()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            capture.record(record.created, record.levelno, format_record(record))

    root = logging.getLogger()
    root.addHandler(Handler())
    root.setLevel(logging.DEBUG)
    state = ProcessState()
    log = logging.getLogger("bench")

    devnull = os.open(os.devnull, os.O_WRONLY)

    def silent(fd: int) -> None:
        pass

    def one_line(fd: int) -> None:
        os.write(fd, b"one line\n")  # into the capture during an attempt; to /dev/null in the bare rounds

    def one_record(fd: int) -> None:
        log.info("one record")

    out = {}
    for name, body in (("silent", silent), ("one_line", one_line), ("one_record", one_record)):
        rounds = []
        for _ in range(args.reps):
            t0 = time.thread_time()
            for _ in range(args.n):
                capture.start()
                body(1)
                capture.stop(state)
            rounds.append((time.thread_time() - t0) / args.n * 1e6)
        bare = []
        for _ in range(args.reps):
            t0 = time.thread_time()
            for _ in range(args.n):
                body(devnull)
            bare.append((time.thread_time() - t0) / args.n * 1e6)
        out[name] = round(statistics.median(rounds) - statistics.median(bare), 2)
    print(json.dumps({"us_per_attempt": out, "n": args.n, "reps": args.reps}))


if __name__ == "__main__":
    main()
