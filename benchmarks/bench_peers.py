"""T1 and T2: checkmate against the peers through the shared harness's worker processes.

Every contender runs in its own process (`peers/cm_worker.py`: the shared
``worker.py`` with checkmate registered), round after round, the order rotated
each round like the shared ``run_all.py``; ratios are taken per round (paired)
and the median of those ratios is reported. Import times are measured in fresh
interpreters, interleaved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from typing import Any

from bench_util import PEERS_DIR, delete_later, log, med, now, tmp_root

WORKER = PEERS_DIR / "cm_worker.py"

# name -> (takes the resume scenario, note)
CONTENDERS: dict[str, tuple[bool, str]] = {
    "checkmate:local": (
        True,
        "LocalTaskIO: one journal write + fdatasync per stage (its RUNNING with the "
        "previous COMPLETE)",
    ),
    "checkmate:local_flush": (True, "same, and each run waits for the deferred checkpoint"),
    "checkmate:memory": (True, "FsspecTaskIO memory://: the engine's own cost, no disk"),
    "floor:fsync": (True, "2 x (temp file + fsync + replace) per step"),
    "floor:append_fsync": (True, "one JSON-lines journal, append + fsync per record"),
    "langgraph:sqlite_sync": (True, "SqliteSaver, durability=sync"),
    "langgraph:memory_sync": (False, "InMemorySaver: framework cost, no disk"),
    "dbos:sqlite": (True, "DBOS 3.4 workflow + steps, SQLite system DB"),
    "luigi:local": (True, "chained tasks, LocalTarget, no fsync"),
}
NS = ("20", "200")


def run_worker(args: list[str], timeout: float) -> tuple[dict[str, Any] | None, float, str]:
    """Run one worker process; return its record, its spawn-to-exit wall and any error.

    Its work dir is deleted when the benchmark ends (`bench_util.delete_later`).
    """
    cmd = [sys.executable, str(WORKER), *args, "--keep"]
    t0 = now()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=str(PEERS_DIR), check=False
        )
    except subprocess.TimeoutExpired:
        return None, now() - t0, f"timeout after {timeout:.0f}s"
    wall = now() - t0
    rec = None
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            rec = json.loads(line[len("@@RESULT ") :])
    if rec is not None and rec.get("workdir"):
        delete_later(rec["workdir"])
    err = "" if rec is not None else (proc.stderr[-3000:] or f"rc={proc.returncode}")
    return rec, wall, err


def run_rounds(rounds: int, reps: int, names: list[str] | None = None) -> list[dict[str, Any]]:
    """All contenders interleaved, order rotated each round; one record per worker process."""
    names = names or list(CONTENDERS)
    records: list[dict[str, Any]] = []
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            args = [name, "--reps", str(reps), "--warmup", "1", "--tag", f"round{r}"]
            if CONTENDERS[name][0]:
                args += ["--resume", "200:150"]
            rec, wall, err = run_worker(args, timeout=600)
            if rec is None:
                rec = {"contender": name, "error": err}
            rec.update({"round": r, "proc_wall_s": wall})
            records.append(rec)
            status = "ERROR " + err.strip().splitlines()[-1][:200] if "error" in rec else "ok"
            log(f"  T1 round {r + 1}/{rounds} {name:24s} {wall:6.1f}s {status}")
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per contender and N: medians; per round: the medians used for paired ratios."""
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"runs": defaultdict(list), "inner": defaultdict(list), "cpu": defaultdict(list)}
    )
    by_round: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    errors = []
    for rec in records:
        if "error" in rec:
            errors.append(f"{rec['contender']} (round {rec['round']}): {rec['error'][-300:]}")
            continue
        name = rec["contender"]
        entry = per[name]
        one: dict[str, float] = {}
        for n in NS:
            if n not in rec.get("runs_s", {}):
                continue
            entry["runs"][n] += rec["runs_s"][n]
            entry["inner"][n] += rec["inner_s"][n]
            entry["cpu"][n] += rec["cpu_s"][n]
            one[f"wall{n}"] = med(rec["runs_s"][n]) / int(n)
            one[f"marg{n}"] = med(rec["inner_s"][n]) / (int(n) - 1)
            one[f"cpu{n}"] = med(rec["cpu_s"][n]) / int(n)
        by_round[name][rec["round"]] = one
        entry.setdefault("import_s", []).append(rec["import_s"])
        entry.setdefault("setup_s", []).append(rec["setup_s"])
        entry.setdefault("proc_wall_s", []).append(rec["proc_wall_s"])
        if "resume" in rec:
            entry.setdefault("resume_s", []).append(rec["resume"]["to_fail_step_s"])
            entry.setdefault("rerun", []).append(rec["resume"].get("step_bodies_rerun", 0))
    rows = {}
    for name, entry in per.items():
        row: dict[str, Any] = {"note": CONTENDERS.get(name, (False, ""))[1]}
        for n in NS:
            if entry["runs"][n]:
                row[f"wall{n}"] = med(entry["runs"][n]) / int(n)
                row[f"marg{n}"] = med(entry["inner"][n]) / (int(n) - 1)
                row[f"cpu{n}"] = med(entry["cpu"][n]) / int(n)
                row[f"runs{n}"] = len(entry["runs"][n])
        row["import_s"] = med(entry.get("import_s", []))
        row["setup_s"] = med(entry.get("setup_s", []))
        row["proc_wall_s"] = med(entry.get("proc_wall_s", []))
        if entry.get("resume_s"):
            row["resume_s"] = med(entry["resume_s"])
            row["rerun"] = max(entry["rerun"])
        rows[name] = row
    return {"rows": rows, "by_round": dict(by_round), "errors": errors}


def paired_ratio(summary: dict[str, Any], a: str, b: str, metric: str) -> tuple[float, list[float]]:
    """Median over rounds of metric(a) / metric(b), both from the same round."""
    by_round = summary["by_round"]
    ratios = []
    for r, one in by_round.get(a, {}).items():
        if metric not in one:
            continue
        other = by_round.get(b, {}).get(r, {}).get(metric)
        if other:
            ratios.append(one[metric] / other)
    return med(ratios), ratios


def engine_cpu_per_stage(records: list[dict[str, Any]], name: str = "checkmate:memory") -> dict:
    """Process CPU per stage, marginal between the N=20 and N=200 runs of each rep."""
    values = []
    for rec in records:
        if rec.get("contender") != name or "cpu_s" not in rec:
            continue
        for c20, c200 in zip(rec["cpu_s"]["20"], rec["cpu_s"]["200"], strict=True):
            values.append((c200 - c20) / 180)
    return {"median_s": med(values), "samples": len(values), "values": values}


IMPORT_SNIPPET = "import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"


def import_times(samples: int, snippets: dict[str, str]) -> dict[str, list[float]]:
    """Time each snippet (``label -> code``, e.g. ``import X``) in fresh interpreters.

    Interpreter start is not counted; the snippets run interleaved.
    """
    out: dict[str, list[float]] = {label: [] for label in snippets}
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for i in range(samples + 1):  # the first pass warms the page cache; not counted
        for label, code in snippets.items():
            proc = subprocess.run(
                [sys.executable, "-c", IMPORT_SNIPPET.format(code=code)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
                cwd=tmp_root(),
            )
            if i:
                out[label].append(float(proc.stdout.strip().splitlines()[-1]))
    return out
