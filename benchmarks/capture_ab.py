"""What output capture and the process-state reset cost a run: the same runs with them on and switched off.

    python benchmarks/capture_ab.py [--blocks 12] [--rounds 4] [--fanout 2000] [--chain 1000]
                                    [--off both|capture] [--before PATH] [--watched]

Long-lived child processes, each warmed once: an engine whose workers
capture and reset as shipped ("on"), an engine whose workers do not
("off": ``Capture.start``/``stop`` and, with ``--off both``, the reset made
no-ops inside the worker processes only; a measurement, not a mode), a bare
``ProcessPoolExecutor`` ("pool") doing the same work, and with ``--before``
an engine running the wfaas of another checkout ("before", capture on).
With ``--watched``, every engine has an event subscriber (as under the
CLI), so its workers send what a step printed in the reply, not after it.

Each round runs every workload once in each child, in an order that
alternates, while the others sleep: a slow minute of this shared machine
hits every side. A child's placement on the two cores biases all its runs
the same way (the "off" engine of one run was 30 % slower than the "on"
one in every round), so children are started afresh for each of
``--blocks`` blocks of ``--rounds`` rounds, in a rotating order.

Figures: wall µs per step (medians over every round), and each ratio (a/b)
as the median over blocks of each block's median ratio of its rounds, with
a 95 % bootstrap interval over blocks. "Capturing does not cost the
per-step path measurably" holds when on/off's interval contains 1.0. Prints
one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import itertools
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
_WATCHED_ENV = "WFAAS_AB_WATCHED"
WORKLOADS = ("fanout", "chain")


def worker_main_off(conn: Any, *args: Any) -> None:
    """``wfaas._worker.main`` with the per-attempt capture (and with ``$WFAAS_AB_OFF=both`` the process-state
    reset) made no-ops, in this worker only."""
    from wfaas import _worker, capture

    both = os.environ.get(_OFF_ENV) == "both"
    state: Any = capture.ProcessState
    capture.Capture.start = lambda self: None  # type: ignore[method-assign]
    if hasattr(state, "restore_first"):  # the code before bbb11e2 (RESULTS.md compares): part of the reset in stop
        capture.Capture.stop = lambda self, st: ([], 0, 0, None if both else st.restore_first())  # type: ignore
        if both:
            state.restore_first = state.restore_rest = lambda self: None
    else:
        capture.Capture.stop = lambda self, st: ([], 0, 0, None)  # type: ignore[method-assign]
        if both:
            state.restore = lambda self: None
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
        if os.environ.get(_WATCHED_ENV):
            engine.event_bus.subscribe(lambda event: None)  # as the CLI's progress does
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
    def __init__(self, mode: str, fanout: int, chain: int, code: str | None = None) -> None:
        serve = "on" if mode == "before" else mode
        cmd = [sys.executable, __file__, "--serve", serve, "--fanout", str(fanout), "--chain", str(chain)]
        # Another checkout's wfaas, first on sys.path; run from there too, as forkserver's children put the
        # working directory first.
        env = {**os.environ, "PYTHONPATH": code} if code else None
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, text=True, env=env, cwd=code)

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


def compare(got: dict[str, list[list[float]]], a: str, b: str) -> dict[str, Any]:
    """``a`` over ``b``: each block's median of its rounds' ratios; their median and a 95 % interval (over blocks)."""
    blocks = [
        statistics.median(x / y for x, y in zip(ra, rb, strict=True)) for ra, rb in zip(got[a], got[b], strict=True)
    ]
    low, high = bootstrap_median(blocks)
    return {"median": round(statistics.median(blocks), 3), "95": [round(low, 3), round(high, 3)], "blocks": blocks}


def ratio(r: dict[str, Any]) -> str:
    return f"{r['median']:.3f} ({r['95'][0]:.3f}–{r['95'][1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12, help="fresh children for each block")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per block")
    parser.add_argument("--fanout", type=int, default=2000, help="steps of the fan-out (then a join)")
    parser.add_argument("--chain", type=int, default=1000, help="steps of the chain")
    parser.add_argument("--off", choices=("capture", "both"), default="both", help="what the 'off' side switches off")
    parser.add_argument("--before", metavar="PATH", help="also run 'on' with the wfaas of this checkout ('before')")
    parser.add_argument("--watched", action="store_true", help="engines with an event subscriber, as the CLI's")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ[_OFF_ENV] = args.off
    if args.watched:
        os.environ[_WATCHED_ENV] = "1"
    if args.serve:
        serve(args.serve, args.fanout, args.chain)
        return
    modes = [*MODES, "before"] if args.before else list(MODES)
    # got[workload][mode][block] -> wall µs per step of each round
    got: dict[str, dict[str, list[list[float]]]] = {w: {m: [] for m in modes} for w in WORKLOADS}
    load = os.getloadavg()[0]
    for block in range(args.blocks):
        starting = modes[block % len(modes) :] + modes[: block % len(modes)]  # who starts first rotates too
        children = {m: Child(m, args.fanout, args.chain, args.before if m == "before" else None) for m in starting}
        try:
            for workload in WORKLOADS:  # a first run of each, not counted: the workers take in its bodies and data
                for mode in modes:
                    children[mode].run(workload)
            for workload in WORKLOADS:
                for mode in modes:
                    got[workload][mode].append([])
            for r in range(args.rounds):
                order = modes if (block + r) % 2 == 0 else modes[::-1]
                for workload in WORKLOADS:
                    for mode in order:
                        got[workload][mode][-1].append(children[mode].run(workload)["us_per_step"])
        finally:
            for child in children.values():
                child.close()
    out: dict[str, Any] = {"off": args.off, "watched": args.watched, "blocks": args.blocks, "rounds": args.rounds}
    out["before"] = args.before
    out |= {"fanout_steps": args.fanout, "chain_steps": args.chain}
    out["load_before"], out["load_after"] = round(load, 2), round(os.getloadavg()[0], 2)
    pairs = [("on", "off"), ("on", "pool")] + ([("on", "before"), ("before", "off")] if args.before else [])
    for workload in WORKLOADS:
        out[workload] = {
            f"{m}_us": round(statistics.median(itertools.chain.from_iterable(got[workload][m])), 2) for m in modes
        }
        out[workload] |= {f"{a}/{b}": compare(got[workload], a, b) for a, b in pairs}
    print(json.dumps(out))
    print()
    print(f"| workload | {' | '.join(f'{m} µs/step' for m in modes)} | {' | '.join(f'{a}/{b}' for a, b in pairs)} |")
    print("|---" * (1 + len(modes) + len(pairs)) + "|")
    for workload in WORKLOADS:
        f = out[workload]
        walls = " | ".join(f"{f[f'{m}_us']:.1f}" for m in modes)
        ratios = " | ".join(ratio(f[f"{a}/{b}"]) for a, b in pairs)
        print(f"| {workload} | {walls} | {ratios} |")


if __name__ == "__main__":
    main()
