"""T4 and T5 (local disk, durable), and profiles of the checkmate paths, in this process.

checkmate runs through the same contender class as in the peer harness
(`peers/c_checkmate.py`, variant ``local``), the floors through the shared
``c_floor``; every comparison is interleaved round by round in this process,
and the background journal checkpoint that checkmate starts at unbind is
waited for (``flush``) outside the timings, so that it never lands in another
contender's measurement (its duration is recorded).

No run's files are deleted before the whole benchmark ends (`bench_util.delete_later`).
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import time
import uuid
from typing import Any

from bench_util import add_harness_paths, log, med, now, temp_dir

add_harness_paths()

import c_floor  # noqa: E402
from c_checkmate import Contender as CheckmateContender  # noqa: E402
from c_checkmate import Interrupted, make_stages  # noqa: E402
from common import FAILER, Payload, StepFailure, make_payload  # noqa: E402

from checkmate import (  # noqa: E402
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    LocalTaskIO,
    StageStateHistoryEntry,
    StageStatus,
)

S = StageStatus
COUNTS = (10, 100, 1000)
SIZES = (1024, 100 * 1024, 1024 * 1024, 10 * 1024 * 1024)
CONTENDER_NAMES = ("checkmate:local", "floor:fsync", "floor:append_fsync")


def sized_payload(size: int) -> Payload:
    """The shared 1 KB payload, its ``notes`` padded so that its JSON has ``size`` bytes."""
    base = make_payload()
    if size <= len(base.model_dump_json()):
        return base
    filler = "x" * (size - len(base.model_dump_json()))
    return base.model_copy(update={"notes": base.notes + filler})


def _contenders(root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CONTENDER_NAMES:
        base, _, variant = name.partition(":")
        c = CheckmateContender(variant) if base == "checkmate" else c_floor.Contender(variant)
        workdir = os.path.join(root, name.replace(":", "-"))
        os.makedirs(workdir)
        c.setup(workdir)
        out[name] = c
    return out


def run_once(name: str, c: Any, n: int, payload: Payload) -> dict[str, float]:
    """One pipeline; wall, marginal per stage, and (checkmate) the deferred checkpoint."""
    run_id = f"r{n}-{uuid.uuid4().hex[:10]}"
    FAILER.marks.clear()
    t0 = now()
    out = c.run(n, run_id, payload)
    wall = now() - t0
    assert out == payload, "pipeline output differs from input"
    assert len(FAILER.marks) == n
    result = {"wall": wall / n, "marg": (FAILER.marks[n] - FAILER.marks[1]) / (n - 1)}
    if name.startswith("checkmate"):
        t0 = now()
        c.io.flush()
        result["flush"] = (now() - t0) / n
    # The run's files stay until the benchmark ends (see the module docstring).
    return result


def _series(
    contenders: dict[str, Any],
    points: tuple[int, ...],
    reps: dict[int, int],
    rounds: int,
    make: Any,
    n_of: Any,
    label: str,
) -> dict[str, Any]:
    """Per (contender, point): per-round medians of wall/marg/flush per stage."""
    data: dict[str, dict[int, dict[str, list[float]]]] = {
        name: {p: {"wall": [], "marg": [], "flush": []} for p in points} for name in contenders
    }
    names = list(contenders)
    for r in range(rounds):
        # each contender's points back to back (the drift of a shared machine hits them
        # alike), the contender order rotated and the point order reversed every round
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for p in points if r % 2 == 0 else points[::-1]:
                payload = make(p)
                runs = [run_once(name, contenders[name], n_of(p), payload) for _ in range(reps[p])]
                for key in ("wall", "marg", "flush"):
                    vals = [x[key] for x in runs if key in x]
                    if vals:
                        data[name][p][key].append(med(vals))
        log(f"  {label} round {r + 1}/{rounds} done")
    return data


def scaling(quick: bool) -> dict[str, Any]:
    """Per-stage cost vs number of stages (1 KB state) and vs state size (5 stages)."""
    out: dict[str, Any] = {}
    with temp_dir("checkmate-bench-t4-") as root:
        contenders = _contenders(root)
        payload = make_payload()
        for name, c in contenders.items():  # warm-up, not counted
            run_once(name, c, 20, payload)
        count_reps = {10: 3, 100: 2, 1000: 1} if quick else {10: 7, 100: 3, 1000: 1}
        out["counts"] = _series(
            contenders,
            COUNTS,
            count_reps,
            1 if quick else 5,
            lambda _p: payload,
            lambda p: p,
            "T4 stages",
        )
        size_reps = {SIZES[0]: 3, SIZES[1]: 3, SIZES[2]: 2, SIZES[3]: 1}
        if quick:
            size_reps = dict.fromkeys(SIZES, 1)
        out["sizes"] = _series(
            contenders,
            SIZES,
            size_reps,
            1 if quick else 3,
            sized_payload,
            lambda _p: 5,
            "T4 sizes",
        )
        for c in contenders.values():
            c.teardown()
    cm = out["counts"]["checkmate:local"]
    for key in ("marg", "wall"):
        ratios = [a / b for a, b in zip(cm[1000][key], cm[10][key], strict=True)]
        out[f"ratio_1000_10_{key}"] = med(ratios)
        out[f"ratios_1000_10_{key}"] = ratios
    return out


# ---------------------------------------------------------------- one status change


class BlobState(BaseStageState[Any]):
    blob: str = ""


class Holder(BaseStage[BlobState]):
    def execute_stage(self, previous_state_copy: BlobState) -> None:
        del previous_state_copy


def _synthetic_history(state: BlobState, entries: int) -> None:
    """Give a CREATED stage's state ``entries`` more valid history entries (RUNNING/RETRY)."""
    previous = state.status
    attempt = state.attempts
    stamp = "2026-11-22T12:00:00.000000+00:00"
    for i in range(entries):
        if previous is S.RUNNING:
            nxt, message = S.RETRY, f"attempt {attempt} failed: RuntimeError('try {i}'); will retry"
        else:
            attempt += 1
            nxt, message = S.RUNNING, f"attempt {attempt} started"
        state.history.append(
            StageStateHistoryEntry(
                attempt=attempt,
                begin_status=previous,
                end_status=nxt,
                begin_ts=stamp,
                end_ts=stamp,
                message=message,
                run_time_seconds=0.001,
            )
        )
        previous = nxt
    state.status = previous
    state.attempts = attempt


def floor_write(path: str, data: bytes) -> float:
    """The floor's durable write of ``data``: temp file, write, fsync, replace (c_floor)."""
    t0 = now()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return now() - t0


def status_change(kind: str, quick: bool) -> dict[str, Any]:
    """Cost of one persisted status change of a stage vs the floor writing the same bytes.

    kind: ``history`` (the stage's state carries 1,000 history entries), ``10MB``
    (a 10 MB field in the state) or ``1KB`` (a fresh stage with a 1 KB field).
    """
    rounds, k = {
        "history": (2, 10) if quick else (5, 20),
        "10MB": (2, 3) if quick else (4, 4),
        "1KB": (2, 10) if quick else (5, 20),
    }[kind]
    blob = {"10MB": "x" * (10 * 1024 * 1024), "1KB": "x" * 700}.get(kind, "")
    with temp_dir(f"checkmate-bench-change-{kind}-") as root:
        io = LocalTaskIO(os.path.join(root, "cm"))
        floor_dir = os.path.join(root, "floor")
        os.makedirs(floor_dir)
        floor_path = os.path.join(floor_dir, "stage.json")
        engine = CheckMateEngine(
            io,
            task_id=f"change-{kind}",
            stage_templates=[Holder(stage_name="stage", state=BlobState(blob=blob))],
        )
        engine.bind()
        stage = engine.stages[0]
        if kind == "history":
            _synthetic_history(stage.state, 999)  # + "stage created" = 1,000 entries
        seed = S.RETRY if stage.state.status is S.RUNNING else S.RUNNING
        stage.update_status("benchmark: first write of the prepared state", seed, time.time())
        obj = stage.obj_name
        history_at_start = len(stage.state.history)
        cm_rounds, floor_rounds, ratios, sizes = [], [], [], []
        ser_ratios: list[float] = []
        for r in range(rounds):
            cm_t: list[float] = []
            floor_t: list[float] = []
            ser_t: list[float] = []

            def checkmate_changes(cm_t: list[float] = cm_t) -> None:
                for _ in range(k):
                    nxt = S.RETRY if stage.state.status is S.RUNNING else S.RUNNING
                    t0 = now()
                    stage.update_status("benchmark status change", nxt, time.time())
                    cm_t.append(now() - t0)

            def serialise(ser_t: list[float] = ser_t) -> None:
                # The lower bound of any JSON engine: the stage's own JSON, nothing else.
                for _ in range(k):
                    t0 = now()
                    stage.model_dump_json()
                    ser_t.append(now() - t0)

            def floor_writes(floor_t: list[float] = floor_t) -> None:
                data = io.read(obj)  # the bytes of the object as checkmate last wrote it
                sizes.append(len(data))
                for _ in range(k):
                    floor_t.append(floor_write(floor_path, data))

            order = [checkmate_changes, serialise, floor_writes]
            for func in order if r % 2 == 0 else order[::-1]:
                func()
            cm_rounds.append(cm_t)
            floor_rounds.append(floor_t)
            ratios.append(sum(cm_t) / sum(floor_t))
            ser_ratios.append(sum(ser_t) / sum(floor_t))
        history_at_end = len(stage.state.history)
        engine.unbind()
        io.flush()
    all_cm = [x for xs in cm_rounds for x in xs]
    all_floor = [x for xs in floor_rounds for x in xs]
    result = {
        "kind": kind,
        "rounds": rounds,
        "changes_per_round": k,
        "bytes": med(sizes),
        "history_entries": [history_at_start, history_at_end],
        "cm_mean_s": sum(all_cm) / len(all_cm),
        "cm_median_s": med(all_cm),
        "floor_mean_s": sum(all_floor) / len(all_floor),
        "floor_median_s": med(all_floor),
        "ratios": ratios,
        "ratio": med(ratios),
        "serialise_ratio": med(ser_ratios),
    }
    log(
        f"  T4 status change ({kind}, {result['bytes'] / 1024:,.0f} KiB): "
        f"{result['cm_mean_s'] * 1e3:.2f} ms vs floor {result['floor_mean_s'] * 1e3:.2f} ms "
        f"-> {result['ratio']:.2f}x (its JSON serialisation alone: "
        f"{result['serialise_ratio']:.2f}x)"
    )
    return result


# ---------------------------------------------------------------- T5: resume


def resume_bind(quick: bool) -> dict[str, Any]:
    """Bind a 200-stage task with 199 COMPLETE stages vs the floor reading 199 state files."""
    n, task_id = 200, "resume-task"
    payload = make_payload()
    reps = 3 if quick else 9
    with temp_dir("checkmate-bench-t5-") as root:
        cm = CheckmateContender("local")
        os.makedirs(os.path.join(root, "cm"))
        cm.setup(os.path.join(root, "cm"))
        FAILER.arm(n)
        try:
            cm.run(n, task_id, payload)
            raise AssertionError("injected failure did not fire")
        except Interrupted:
            pass
        cm.io.flush()
        floor = c_floor.Contender("fsync")
        os.makedirs(os.path.join(root, "floor"))
        floor.setup(os.path.join(root, "floor"))
        FAILER.arm(n)
        try:
            floor.run(n, task_id, payload)
            raise AssertionError("injected failure did not fire")
        except StepFailure:
            pass
        FAILER.at = None
        templates = make_stages(n, payload)
        samples: dict[str, list[float]] = {"fresh": [], "warm": [], "floor": []}

        def bind(io: LocalTaskIO) -> float:
            engine = CheckMateEngine(io, task_id=task_id, stage_templates=templates)
            t0 = now()
            engine.bind()
            seconds = now() - t0
            done = sum(s.state.status is S.COMPLETE for s in engine.stages)
            assert done == n - 1, done
            engine.unbind()
            io.flush()
            return seconds

        def fresh() -> float:
            # a new TaskIO, as in a new process: the first touch replays the journal
            return bind(LocalTaskIO(cm.io.root))

        def warm() -> float:
            return bind(cm.io)

        def read_floor() -> float:
            t0 = now()
            floor.recover(n - 1, task_id, payload)
            seconds = now() - t0
            assert floor.skipped == n - 1
            return seconds

        order = [("fresh", fresh), ("warm", warm), ("floor", read_floor)]
        for rep in range(reps + 1):
            k = rep % len(order)
            for label, func in order[k:] + order[:k]:
                seconds = func()
                if rep:  # the first pass is a warm-up
                    samples[label].append(seconds)
        cm.teardown()
    ratios = [a / b for a, b in zip(samples["fresh"], samples["floor"], strict=True)]
    ratios_warm = [a / b for a, b in zip(samples["warm"], samples["floor"], strict=True)]
    result = {
        "stages": n,
        "complete": n - 1,
        "samples_s": samples,
        "ratio": med(ratios),
        "ratio_warm": med(ratios_warm),
        "fresh_s": med(samples["fresh"]),
        "warm_s": med(samples["warm"]),
        "floor_s": med(samples["floor"]),
    }
    log(
        f"  T5 bind {result['fresh_s'] * 1e3:.1f} ms (same TaskIO {result['warm_s'] * 1e3:.1f}) "
        f"vs floor {result['floor_s'] * 1e3:.1f} ms -> {result['ratio']:.2f}x"
    )
    return result


# ---------------------------------------------------------------- profiles


def _top(profile: cProfile.Profile, per: int, limit: int = 10) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile)
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        short = filename
        for marker in ("/checkmate/", "/site-packages/", "/lib/python"):
            if marker in filename:
                short = filename.split(marker, 1)[1]
                short = ("checkmate/" + short) if marker == "/checkmate/" else short
                break
        name = f"{short}:{line}({func})" if line else func
        rows.append(
            {
                "function": name,
                "calls_per_unit": calls / per,
                "tottime_per_unit_s": tottime / per,
                "cumtime_per_unit_s": cumtime / per,
            }
        )
    rows.sort(key=lambda r: r["tottime_per_unit_s"], reverse=True)
    return rows[:limit]


def profiles() -> dict[str, Any]:
    """cProfile of 3 x 200-stage runs (memory://, local) and of the resume bind."""
    out: dict[str, Any] = {}
    payload = make_payload()
    with temp_dir("checkmate-bench-prof-") as root:
        for variant in ("memory", "local"):
            c = CheckmateContender(variant)
            workdir = os.path.join(root, variant)
            os.makedirs(workdir)
            c.setup(workdir)
            c.run(200, f"warm-{variant}", payload)
            if variant == "local":
                c.io.flush()
            profile = cProfile.Profile()
            t0, c0 = now(), time.process_time()
            profile.enable()
            for i in range(3):
                c.run(200, f"prof-{variant}-{i}", payload)
            profile.disable()
            wall, cpu = (now() - t0) / 600, (time.process_time() - c0) / 600
            c.teardown()
            out[variant] = {
                "wall_per_stage_s": wall,
                "cpu_per_stage_s": cpu,
                "top": _top(profile, 600),
            }
        out["phases"] = _phases(root, payload)
        # the resume bind (fresh TaskIO) of a 200-stage task with 199 COMPLETE stages
        c = CheckmateContender("local")
        workdir = os.path.join(root, "resume")
        os.makedirs(workdir)
        c.setup(workdir)
        FAILER.arm(200)
        with contextlib.suppress(Interrupted):
            c.run(200, "resume", payload)
        FAILER.at = None
        c.io.flush()
        templates = make_stages(200, payload)
        profile = cProfile.Profile()
        for _ in range(3):
            io = LocalTaskIO(c.io.root)
            engine = CheckMateEngine(io, task_id="resume", stage_templates=templates)
            profile.enable()
            engine.bind()
            profile.disable()
            engine.unbind()
            io.flush()
        out["resume_bind"] = {"top": _top(profile, 3)}
        c.teardown()
    return out


def _phases(root: str, payload: Payload, n: int = 200, reps: int = 3) -> dict[str, float]:
    """Where a 200-stage checkmate:local run spends its wall time: bind, execute, unbind."""
    io = LocalTaskIO(os.path.join(root, "phases"))
    templates = make_stages(n, payload)
    samples: dict[str, list[float]] = {"bind": [], "execute": [], "unbind": [], "flush": []}
    for i in range(reps + 1):
        engine = CheckMateEngine(io, task_id=f"phases-{i}", stage_templates=templates)
        t0 = now()
        engine.bind()
        t1 = now()
        assert engine.execute() is StageStatus.COMPLETE
        t2 = now()
        engine.unbind()
        t3 = now()
        io.flush()
        t4 = now()
        if i:  # the first run is a warm-up
            for key, seconds in zip(samples, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                samples[key].append(seconds)
    return {"stages": n, **{key: med(xs) for key, xs in samples.items()}}
