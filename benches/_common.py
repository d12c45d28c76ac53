"""Small helpers shared by the benchmark scripts: machine description, timing, CSV and markdown output.

Kept generic (no gems imports) so any bench script can use it::

    from _common import machine_description, time_fn, write_csv, write_markdown

Run bench scripts from the repository root (``python benches/bench_x.py``); the script's directory is
then on ``sys.path`` and ``import _common`` works.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: str | torch.device = "cpu") -> str:
    """One line naming the machine: CPU model and cores (or the GPU), torch version, threads."""
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu_model()}, {cores} cores available, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        parts.insert(0, f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    return "; ".join(parts)


def synchronize(device: str | torch.device = "cpu") -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` timed times; wall-clock seconds.

    Returns ``{"median", "min", "max", "n", "cpu_median"}``; ``cpu_median`` is the process CPU time
    (all threads) per run, a work measure that is less sensitive than wall time to other jobs on the
    same cores. ``max_seconds`` stops repeating early (after at least one
    timed run) once the timed runs' total exceeds it, for slow baselines."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(max(1, repeats)):
        cpu_start = time.process_time()
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        if max_seconds is not None and sum(times) > max_seconds:
            break
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
        "cpu_median": statistics.median(cpu),
    }


def write_csv(path: str | Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV (columns: given order, else first-seen key order). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})
    return path


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """GitHub-flavoured markdown table of dict rows."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(_fmt(row.get(k, ""))) for k in columns) + " |")
    return "\n".join(lines)


def write_markdown(
    path: str | Path,
    title: str,
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    *,
    preamble: str = "",
    notes: str = "",
) -> Path:
    """Write a markdown file: title, preamble (e.g. machine and command), the table, notes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\n"
    if preamble:
        text += preamble.strip() + "\n\n"
    text += markdown_table(rows, columns) + "\n"
    if notes:
        text += "\n" + notes.strip() + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def print_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> None:
    """Aligned plain-text table on stdout."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(_fmt(row.get(k, ""))) for k in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
