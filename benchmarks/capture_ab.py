"""What output capture and the process-state reset cost a run: the same runs with them on and switched off.

    python benchmarks/capture_ab.py [--rounds 40] [--fanout 2000] [--chain 1000] [--off capture|both]

Three long-lived child processes, each warmed once: an engine whose workers
capture and reset as shipped ("on"), an engine whose workers do not capture
("off": ``Capture.start``/``stop`` replaced by no-ops inside the worker
processes only; with ``--off both``, ``ProcessState.restore`` too; a
measurement, not a mode), and a bare ``ProcessPoolExecutor`` ("pool") doing
the same work. Each round runs every workload once in each, in an order that
alternates (on, off, pool, then pool, off, on), while the other two children
sleep; so a slow minute of this shared machine hits both sides of a pair.

Figures: wall µs per step, and for each workload the ratio on/off of every
round's pair, its median and a 95 % bootstrap interval of that median. The
item "capturing does not cost the per-step path measurably" holds when the
interval contains 1.0 (and its median is within the rounds' own spread).
The workers' CPU per step is printed too, but reads high by whatever the
workers spent looking for their next step (``dispatch.SPIN``), which depends
on timing: the wall ratio is the figure. Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402 - the workloads and measuring helpers of run.py

MODES = ("on", "off", "pool")
_OFF_ENV = "WFAAS_AB_OFF"
WORKLOADS = ("fanout", "chain")


def worker_main_off(conn: Any, *args: Any) -> None:
    """``wfaas._worker.main`` with the per-attempt capture (and with ``$WFAAS_AB_OFF=both`` the process-state
    reset) made no-ops, in this worker only."""
    from wfaas import _worker, capture

    capture.Capture.start = lambda self: None  # type: ignore[method-assign]
    capture.Capture.stop = lambda self, state: ([], 0, 0, None)  # type: ignore[method-assign]
    if os.environ.get(_OFF_ENV) == "both":
        capture.ProcessState.restore = lambda self: None  # type: ignore[method-assign]
    _worker.main(conn, *args)


def serve(mode: str, fanout: int, chain: int) -> None:
    """A child: run what stdin asks ("fanout" / "chain"), answer one JSON line of figures each."""
    if mode == "pool":
        serve_pool(fanout, chain)
        return
    from wfaas import _worker

    import capture_ab  # this file by module name, so that workers find worker_main_off

    if mode == "off":
        _worker.main = capture_ab.worker_main_off  # type: ignore[assignment]
    m = bench.w()
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench.new_engine("memory", tmp)
        engine.register_workflow(bench.fanout_def("fanout", [bench.fan_body(i) for i in range(fanout)]))
        engine.register_workflow(bench.chain_def("chain", chain, bench.inc_body))
        sizes = {"fanout": fanout, "chain": chain}
        for line in sys.stdin:
            workload = line.strip()
            figures, data = bench.timed_run(engine, workload, m.BenchData())
            expected = sum(i % 7 for i in range(fanout)) if workload == "fanout" else chain
            got = data.total if workload == "fanout" else data.x
            assert got == expected, (workload, got, expected)
            answer(figures, sizes[workload])
        bench.close_engine(engine)


def serve_pool(fanout: int, chain: int) -> None:
    with bench.new_pool() as pool:
        pids = bench.pool_workers(pool)
        for line in sys.stdin:
            workload = line.strip()
            w0, c0, t0 = bench.workers_cpu(pids), bench.proc_cpu(), time.perf_counter()
            if workload == "fanout":
                total = sum(f.result() for f in [pool.submit(bench.mod7, i) for i in range(fanout)])
                assert total == sum(i % 7 for i in range(fanout)), total
            else:
                x = 0
                for _ in range(chain):
                    x = pool.submit(bench.inc, x).result()
                assert x == chain, x
            answer(bench.baseline_figures(t0, c0, w0, pids), fanout if workload == "fanout" else chain)


def answer(figures: dict[str, float], n: int) -> None:
    per_step = {"us_per_step": figures["wall_s"] / n * 1e6, "workers_cpu_us": figures["workers_cpu_s"] / n * 1e6}
    print(json.dumps(per_step))
    sys.stdout.flush()


class Child:
    def __init__(self, mode: str, fanout: int, chain: int) -> None:
        cmd = [sys.executable, __file__, "--serve", mode, "--fanout", str(fanout), "--chain", str(chain)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, workload: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(workload + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a benchmark child ended early (exit {self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def bootstrap_median(values: list[float], draws: int = 5000) -> tuple[float, float]:
    """A 95 % interval of the median of ``values`` (percentile bootstrap; seeded, so reruns agree)."""
    rng = random.Random(13)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--fanout", type=int, default=2000, help="steps of the fan-out (then a join)")
    parser.add_argument("--chain", type=int, default=1000, help="steps of the chain")
    parser.add_argument(
        "--off", choices=("capture", "both"), default="capture", help="what the 'off' side switches off"
    )
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ[_OFF_ENV] = args.off
    if args.serve:
        serve(args.serve, args.fanout, args.chain)
        return
    children = {mode: Child(mode, args.fanout, args.chain) for mode in MODES}
    got: dict[str, dict[str, list[dict[str, float]]]] = {w: {m: [] for m in MODES} for w in WORKLOADS}
    load = os.getloadavg()[0]
    try:
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for workload in WORKLOADS:
                for mode in order:
                    got[workload][mode].append(children[mode].run(workload))
    finally:
        for child in children.values():
            child.close()
    out: dict[str, Any] = {"off": args.off, "rounds": args.rounds, "fanout": args.fanout, "chain": args.chain}
    out["load_before"], out["load_after"] = round(load, 2), round(os.getloadavg()[0], 2)
    for workload in WORKLOADS:
        wall = {m: [f["us_per_step"] for f in got[workload][m]] for m in MODES}
        cpu = {m: [f["workers_cpu_us"] for f in got[workload][m]] for m in MODES}
        pairs = [a / b for a, b in zip(wall["on"], wall["off"], strict=True)]
        low, high = bootstrap_median(pairs)
        out[workload] = {
            **{f"{m}_us": round(statistics.median(wall[m]), 2) for m in MODES},
            **{f"{m}_workers_cpu_us": round(statistics.median(cpu[m]), 2) for m in MODES},
            "on_over_off": round(statistics.median(pairs), 3),
            "on_over_off_95": [round(low, 3), round(high, 3)],
            "on_over_pool": round(statistics.median(wall["on"]) / statistics.median(wall["pool"]), 3),
            "off_over_pool": round(statistics.median(wall["off"]) / statistics.median(wall["pool"]), 3),
            "pairs": [round(p, 3) for p in pairs],
        }
    print(json.dumps(out))
    print()
    print("| workload | on µs/step | off µs/step | on/off (median of pairs, 95 % interval) | on ÷ pool | off ÷ pool |")
    print("|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        f = out[workload]
        interval = f"{f['on_over_off_95'][0]:.3f}–{f['on_over_off_95'][1]:.3f}"
        print(
            f"| {workload} | {f['on_us']:.1f} | {f['off_us']:.1f} | {f['on_over_off']:.3f} ({interval}) "
            f"| {f['on_over_pool']:.2f}× | {f['off_over_pool']:.2f}× |"
        )


if __name__ == "__main__":
    main()
