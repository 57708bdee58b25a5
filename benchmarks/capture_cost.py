"""What wrapping an attempt costs in the worker: output capture and the process-state reset, each on its own.

    python benchmarks/capture_cost.py [--n 20000] [--reps 5]      # in a loop, thread CPU
    python benchmarks/capture_cost.py --in-worker [--steps 2000]  # in the workers of a real engine

In a loop (the default), in this process: ``Capture.start`` + ``Capture.stop``
with a reset that does nothing ("capture"), ``ProcessState.restore`` alone
("reset"), and both as ``_worker`` runs them ("both"), around an attempt that
prints nothing, one that prints one line and one that logs one record. CPU
microseconds per attempt from this thread's CPU clock (load from other
programs does not count), median of ``--reps`` rounds of ``--n`` attempts,
minus the bare body; a printed line also costs the reader thread's time, not
counted here.

``--in-worker`` times the same calls inside the two workers of a
``WorkflowEngine(max_workers=2)`` running a fan-out of ``--steps`` trivial
steps (the workload of ``run.py``): wall microseconds per attempt
(``perf_counter``; the median over every attempt, so a preemption does not
count), and the whole attempt (``_worker._attempt``) for scale: "capture"
(``Capture.start`` and ``stop``, stream flushes included) and
"reset_after_reply" (``ProcessState.restore``); a local worker runs both
after sending the attempt's reply, while the engine reads it (before it:
``start``, one store). This is the figure that matters: between two steps
a worker sleeps while the engine runs, so this code meets a cold cache and
costs two to three times what the loop says.

Both print one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_OUT_ENV = "WFAAS_CAPTURE_COST_DIR"


class _NoReset:
    """Stands in for ProcessState: the capture alone (the streams still flushed, as they must be)."""

    def __init__(self, state: Any) -> None:
        self.flush = state.flush


def in_a_loop(n: int, reps: int) -> dict[str, dict[str, float]]:
    from wfaas.capture import Capture, ProcessState, format_record

    capture = Capture()  # before the state, as in a worker: fds 1 and 2 on its pipe (since the cost work)

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            capture.record(record.created, record.levelno, format_record(record))

    root = logging.getLogger()
    root.addHandler(Handler())
    root.setLevel(logging.DEBUG)
    state = ProcessState()
    no_reset = _NoReset(state)
    log = logging.getLogger("bench")
    devnull = os.open(os.devnull, os.O_WRONLY)

    def silent(fd: int) -> None:
        pass

    def one_line(fd: int) -> None:
        os.write(fd, b"one line\n")  # into the capture during an attempt; to /dev/null in the bare rounds

    def one_record(fd: int) -> None:
        log.info("one record")

    def rounds(run: Callable[[], None]) -> float:
        times = []
        for _ in range(reps):
            t0 = time.thread_time()
            for _ in range(n):
                run()
            times.append((time.thread_time() - t0) / n * 1e6)
        return statistics.median(times)

    out: dict[str, dict[str, float]] = {}
    for name, body in (("silent", silent), ("one_line", one_line), ("one_record", one_record)):

        def capture_only(body: Callable[[int], None] = body) -> None:
            capture.start()
            body(1)
            capture.stop(no_reset)  # type: ignore[arg-type]

        def both(body: Callable[[int], None] = body) -> None:
            capture.start()
            body(1)
            capture.stop(state)
            state.restore()

        bare = rounds(lambda body=body: body(devnull))  # type: ignore[misc]
        out[name] = {
            "capture": round(rounds(capture_only) - bare, 2),
            "reset": round(rounds(state.restore), 2),
            "both": round(rounds(both) - bare, 2),
        }
    close = getattr(capture, "close", None)  # fds 1 and 2 back, so that the result reaches stdout
    if close is not None:
        close()
    return out


def worker_main(conn: Any, *args: Any) -> None:
    """``wfaas._worker.main`` with its capture, reset and attempt timed; medians land in $WFAAS_CAPTURE_COST_DIR.

    Runs in a worker process: it reaches there by name (this module is on the
    engine's ``sys.path``, which forkserver hands to its children).
    """
    from wfaas import _worker, capture

    clock = time.perf_counter_ns
    spent: dict[str, list[int]] = {"capture": [], "reset_after_reply": [], "attempt": []}
    start, stop, restore, attempt = (
        capture.Capture.start,
        capture.Capture.stop,
        capture.ProcessState.restore,
        _worker._attempt,
    )
    pending = [0]

    def timed_start(self: Any) -> None:
        t0 = clock()
        start(self)
        pending[0] = clock() - t0

    def timed_stop(self: Any, state: Any) -> Any:
        t0 = clock()
        out = stop(self, state)
        spent["capture"].append(pending[0] + clock() - t0)
        return out

    def timed_restore(self: Any) -> Any:
        t0 = clock()
        out = restore(self)
        spent["reset_after_reply"].append(clock() - t0)
        return out

    def timed_attempt(*a: Any) -> Any:
        t0 = clock()
        out = attempt(*a)
        spent["attempt"].append(clock() - t0)
        return out

    capture.Capture.start, capture.Capture.stop = timed_start, timed_stop  # type: ignore[method-assign]
    capture.ProcessState.restore = timed_restore  # type: ignore[method-assign]
    _worker._attempt = timed_attempt
    try:
        _worker.main(conn, *args)
    finally:
        out = os.environ.get(_OUT_ENV)
        if out:
            Path(out, f"worker-{os.getpid()}.json").write_text(json.dumps(spent))


def in_workers(steps: int) -> dict[str, Any]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from wfaas import _worker

    import capture_cost  # this file as an importable module, so workers find worker_main by name
    import run as bench  # the fan-out workload of run.py

    with tempfile.TemporaryDirectory() as out:
        os.environ[_OUT_ENV] = out
        _worker.main = capture_cost.worker_main  # type: ignore[assignment]
        with tempfile.TemporaryDirectory() as tmp:
            engine = bench.new_engine("memory", tmp)
            m = bench.w()
            engine.register_workflow(bench.fanout_def("fanout", [bench.fan_body(i) for i in range(steps)]))
            iid = engine.start_workflow("fanout", m.BenchData())
            engine.wait_for_completion(iid, timeout=600)
            bench.close_engine(engine)
        spent: dict[str, list[int]] = {"capture": [], "reset_after_reply": [], "attempt": []}
        for f in Path(out).glob("worker-*.json"):
            for key, values in json.loads(f.read_text()).items():
                spent[key] += values
    medians = {key: round(statistics.median(values) / 1000, 2) for key, values in spent.items() if values}
    return {"in_worker_us": medians, "attempts": len(spent["attempt"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="attempts per round (in a loop)")
    parser.add_argument("--reps", type=int, default=5, help="rounds; the median is reported (in a loop)")
    parser.add_argument("--in-worker", action="store_true", help="time them in the workers of a real engine")
    parser.add_argument("--steps", type=int, default=2000, help="fan-out steps (--in-worker)")
    args = parser.parse_args()
    if args.in_worker:
        print(json.dumps(in_workers(args.steps)))
    else:
        print(json.dumps({"us_per_attempt": in_a_loop(args.n, args.reps), "n": args.n, "reps": args.reps}))


if __name__ == "__main__":
    main()
