"""wfaas against a bare ProcessPoolExecutor, same machine, same run, interleaved.

    python benchmarks/compare.py [--reps N] [--quick] [--only fanout,chain] [--out benchmarks/RESULTS.md]

Each repetition runs in a fresh interpreter (``--child``); repetitions of wfaas
and of the baseline alternate, so load on the machine hits both alike. The
report gives medians with min and max, ratios to the baseline and the targets of
issue 6. ``--quick`` (CI's smoke test) runs one small repetition of each and
writes to a temporary file unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (name, workload function, kwargs, compared to baseline?, quick kwargs)
CASES: list[tuple[str, str, dict[str, Any], bool, dict[str, Any]]] = [
    ("fanout", "fanout", {"n": 500}, True, {"n": 100}),
    ("chain", "chain", {"n": 100}, True, {"n": 20}),
    ("cpu", "cpu", {"n": 8}, True, {"n": 2}),
    ("payload", "payload", {"n": 20}, True, {"n": 4}),
    ("fanout_sqlite", "fanout", {"n": 500, "durable": True}, True, {"n": 100, "durable": True}),
    ("chain_sqlite", "chain", {"n": 100, "durable": True}, True, {"n": 20, "durable": True}),
    ("scale_chain_1k", "scale", {"n": 1000, "shape": "chain"}, False, {"n": 200, "shape": "chain"}),
    ("scale_chain_10k", "scale", {"n": 10000, "shape": "chain"}, False, {"n": 400, "shape": "chain"}),
    ("scale_fanout_1k", "scale", {"n": 1000, "shape": "fanout"}, False, {"n": 200, "shape": "fanout"}),
    ("scale_fanout_10k", "scale", {"n": 10000, "shape": "fanout"}, False, {"n": 400, "shape": "fanout"}),
    ("durable_chain_10k", "scale", {"n": 10000, "shape": "chain", "durable": True}, False, {"n": 400, "durable": True}),
    ("durable_fanout_500", "scale", {"n": 500, "shape": "fanout", "durable": True}, False, {"n": 100, "durable": True}),
    ("mem_fanout_500", "scale", {"n": 500, "shape": "fanout"}, False, {"n": 100, "shape": "fanout"}),
    ("fixed", "fixed", {}, False, {}),
]


def child(workload: str, system: str, kwargs: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE))
    import workloads

    result = getattr(workloads, workload)(system, **kwargs)
    print(json.dumps(result))


def rep(workload: str, system: str, kwargs: dict[str, Any]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", workload, system, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{workload}/{system} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def import_time() -> float:
    code = "import time; t = time.perf_counter(); import wfaas; print(time.perf_counter() - t)"
    times = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(5)]
    return statistics.median(times)


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return (
        f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], json.loads(args.child[2]))
        return
    reps = 1 if args.quick else args.reps
    only = set(filter(None, args.only.split(",")))
    out = (
        Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "RESULTS.md" if args.quick else HERE / "RESULTS.md")
    )
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name, workload, kwargs, compared, quick_kwargs in CASES:
        if only and name not in only:
            continue
        kw = quick_kwargs if args.quick else kwargs
        runs: dict[str, list[dict[str, float]]] = {"wfaas": [], "baseline": []}
        for _ in range(reps):
            runs["wfaas"].append(rep(workload, "wfaas", kw))
            if compared:
                runs["baseline"].append(rep(workload, "baseline", kw))
        results[name] = {
            system: {key: summarize([r[key] for r in rs]) for key in rs[0]} for system, rs in runs.items() if rs
        }
        medians = {s: {k: round(v["median"], 4) for k, v in f.items()} for s, f in results[name].items()}
        print(f"{name}: {json.dumps(medians)}")
    if not only or "import" in only:
        results["import"] = {"wfaas": {"seconds": summarize([import_time()])}}
    command = "python benchmarks/compare.py " + " ".join(a for a in sys.argv[1:])
    write_report(out, results, command.strip(), reps, time.perf_counter() - started)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _m(results: dict[str, Any], name: str, system: str, key: str) -> float | None:
    try:
        return float(results[name][system][key]["median"])
    except KeyError:
        return None


def _spread(results: dict[str, Any], name: str, system: str, key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
    try:
        s = results[name][system][key]
    except KeyError:
        return "–"
    return f"{s['median'] * scale:{fmt}} ({s['min'] * scale:{fmt}}–{s['max'] * scale:{fmt}})"


def write_report(out: Path, results: dict[str, Any], command: str, reps: int, seconds: float) -> None:
    rows = []

    def ratio_row(label: str, name: str, key: str, unit: str, target: float) -> None:
        w, b = _m(results, name, "wfaas", key), _m(results, name, "baseline", key)
        if w is None or b is None:
            return
        r = w / b
        rows.append(
            f"| {label} | {_spread(results, name, 'wfaas', key)} {unit} | {_spread(results, name, 'baseline', key)} "
            f"{unit} | {r:.2f}× | ≤ {target}× | {'met' if r <= target else 'MISSED'} |"
        )

    ratio_row("fanout, 500 trivial steps + join, in-memory", "fanout", "per_step_us", "µs/step", 1.3)
    ratio_row("fanout, SqliteStore", "fanout_sqlite", "per_step_us", "µs/step", 2.0)
    ratio_row("chain, 100 dependent steps, in-memory", "chain", "per_step_ms", "ms/step", 2.0)
    ratio_row("chain, SqliteStore (no target)", "chain_sqlite", "per_step_ms", "ms/step", float("inf"))
    ratio_row("payload, 20 steps passing 5 MB", "payload", "per_step_ms", "ms/step", 1.3)
    w, b = _m(results, "cpu", "wfaas", "efficiency"), _m(results, "cpu", "baseline", "efficiency")
    if w is not None and b is not None:
        rows.append(
            f"| cpu, 8 × 0.5 s on 2 workers: efficiency | {_spread(results, 'cpu', 'wfaas', 'efficiency', fmt='.3f')} "
            f"| {_spread(results, 'cpu', 'baseline', 'efficiency', fmt='.3f')} | {w / b:.3f} of baseline | ≥ 0.97 "
            f"| {'met' if w / b >= 0.97 else 'MISSED'} |"
        )
    scale_rows = []
    for shape in ("chain", "fanout"):
        one, ten = (
            _m(results, f"scale_{shape}_1k", "wfaas", "cpu_per_step_us"),
            _m(results, f"scale_{shape}_10k", "wfaas", "cpu_per_step_us"),
        )
        if one and ten:
            verdict = "met" if ten / one <= 1.5 else "MISSED"
            scale_rows.append(f"| {shape} | {one:.1f} | {ten:.1f} | {ten / one:.2f} | ≤ 1.5 | {verdict} |")
    durable = []
    dc, mc = (
        _m(results, "durable_chain_10k", "wfaas", "cpu_per_step_us"),
        _m(results, "scale_chain_10k", "wfaas", "cpu_per_step_us"),
    )
    if dc and mc:
        durable.append(f"| chain, 10,000 steps | {mc:.1f} | {dc:.1f} | {dc - mc:.1f} |")
    df, mf = (
        _m(results, "durable_fanout_500", "wfaas", "cpu_per_step_us"),
        _m(results, "mem_fanout_500", "wfaas", "cpu_per_step_us"),
    )
    if df and mf:
        durable.append(f"| fan-out, 500 steps | {mf:.1f} | {df:.1f} | {df - mf:.1f} |")
    fixed = results.get("fixed", {}).get("wfaas", {})
    imp = _m(results, "import", "wfaas", "seconds")
    lines = [
        "# Benchmark results",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}` ({reps} repetition(s) each, fresh interpreter per repetition, wfaas and "
        f"baseline interleaved; {seconds:.0f} s in all)",
        "- baseline: a bare `concurrent.futures.ProcessPoolExecutor(max_workers=2)` driven by a loop in the parent; "
        "wfaas: `WorkflowEngine(max_workers=2)`; both warmed before timing",
        "- figures: median (min–max)",
        "",
        "## Against the baseline",
        "",
        "| workload | wfaas | baseline | ratio | target | |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "## Scheduler cost as runs grow (engine-process CPU µs per step)",
        "",
        "| shape | 1,000 steps | 10,000 steps | ratio | target | |",
        "|---|---|---|---|---|---|",
        *scale_rows,
        "",
        "## Checkpoint cost (engine-process CPU µs per step)",
        "",
        "| run | InMemoryStore | SqliteStore | checkpoint cost |",
        "|---|---|---|---|",
        *durable,
        "",
        "## Fixed costs",
        "",
        "| figure | value | target |",
        "|---|---|---|",
    ]
    if imp is not None:
        lines.append(f"| `import wfaas` | {imp:.3f} s | ≤ 0.15 s ({'met' if imp <= 0.15 else 'MISSED'}) |")
    if fixed:
        first = fixed["first_step_s"]["median"]
        lines += [
            f"| engine start (forkserver + 2 warm workers) | {fixed['engine_start_s']['median']:.3f} s | – |",
            f"| `start_workflow` to first step running, cold engine | {first:.3f} s | ≤ 0.3 s "
            f"({'met' if first <= 0.3 else 'MISSED'}) |",
            f"| engine process RSS after a 500-step run | {fixed['engine_rss_mb']['median']:.0f} MiB | – |",
            f"| one worker's RSS | {fixed['worker_rss_mb']['median']:.0f} MiB | – |",
        ]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
