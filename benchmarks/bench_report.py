"""Write docs/performance.md and the per-stage-cost plot from one run's results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench_util import ONE_MODEL, fmt_ms, fmt_us, fmt_x, med

PEER_ORDER = (
    "checkmate:local",
    "checkmate:local_flush",
    "checkmate:memory",
    "floor:fsync",
    "floor:append_fsync",
    "langgraph:sqlite_sync",
    "langgraph:memory_sync",
    "dbos:sqlite",
    "luigi:local",
)
PLOT_STYLE = {
    "checkmate:local": ("tab:blue", "o", "-"),
    "floor:fsync": ("tab:red", "s", "--"),
    "floor:append_fsync": ("tab:green", "^", ":"),
}
WRITE_DESIGN = """## Write design

Every status change must be durable before the engine goes on, and every
stage's state must stay readable as its own JSON object. How each store does it:

**Local disk (`LocalTaskIO`, `file://`).** On these disks making a write
durable is cheap when it only overwrites blocks already on disk (an fdatasync
with no metadata), dearer when the file grows (the new size must be committed
as well), and creating, renaming over or deleting a file is dearer still
(freeing the blocks of a file already on disk is worst). So a write to a task
directory, under an exclusive lock of that directory (flock across processes, a
mutex across threads), is one thing only: it writes a *batch* of records (object
name, full new bytes, their content hash, the record's position in its batch
and the batch's size, CRC-32 of the header) into the directory's journal
`.checkmate-journal`, just after its last record, over zeros written earlier,
and fdatasyncs it. The write is durable when it returns. When a batch does not
fit, the journal grows geometrically (up to 4 MiB at a time) by a zero fill
written with that batch, and that write is fsynced: a few times per task. A
batch of 64 KiB or more (a large state, a long history) is appended without a
fill: zeros would double what it writes to save one fsync's metadata.

The journal *is* the newest version of what it names: every read takes the
directory lock shared and looks in the journal first, then in the plain file.
Each process reads a journal whole once, and after that only the bytes just
after the last record it knows (zeros: nothing new). Versions for
compare-and-swap (leases, fenced stage writes) are the content hashes carried
in the records, so a fenced write needs no read and no hashing of the current
object.

Before each write the process checks that the journal it has open is still the
file at the journal's path (another process may have checkpointed it), without
a `stat` of the journal: on this kernel (fine-grained "multigrain" timestamps),
a `stat` makes the next write change the file's timestamps, and the fdatasync
then writes the inode as well (measured: 85 µs -> 130 µs per write). Linux's
`/proc/self/fd` link of the open file says whether it is still linked at that
path, and `lseek` gives its size; a `stat` is the fallback elsewhere.

While the engine holds a task, its directory's publication is *deferred*: no
per-write file at all. When the engine unbinds, after releasing the lock, it
**publishes** each object's newest bytes as a plain file, whole once visible
(a new file is written unnamed with `O_TMPFILE` and linked into place, which
costs 23 µs a file here instead of 34 for a temp file and a rename; an existing
file is replaced with a temp file and a rename), in the caller's thread (so that
a caller who deletes the store right after the run never races a background
thread creating files), and a background thread
**checkpoints** the journal: one `syncfs(2)` makes every published file
durable (an fsync per file when there are at most 16, or where syncfs is
missing), the directory is fsynced,
and only then is the journal deleted. A finished task is plain JSON files
again. Writes outside a bound task (a user writing their own objects through
the TaskIO) are also published at once with a temp file and a rename (not
fsynced; the journal holds the durable copy), and checkpointed at interpreter
exit. (Publishing finished stages on a background thread while the task runs
was tried and measured: on this 2-core machine the thread's file creations and
its contention for the interpreter lock made each stage about 170 µs slower,
far more than the publication it took off the unbind.)

Two writes that follow each other with no user code in between share one
batch and one fdatasync (`TaskIO.write_many_if`): a new task's CREATED objects are
written as one batch at bind, and a stage's COMPLETE goes out together with the
next stage's RUNNING (or with whatever the engine writes next; before
`execute()` returns or raises it is written on its own). Nothing observes the
COMPLETE before that write: if the process dies first, it is as if it had died
just before the stage returned, and the stage runs again, as after any crash
inside a stage. The state-update hook runs for each change only once it is
durable.

A large object whose new version ends like its last one (a status change of a
stage with a large state changes only the object's first bytes: the stage's
status, attempts and history come before the state's own fields) is written as
a **patch record**: the new head, and where in the journal the unchanged tail
lies, in the last whole record of that object. Versions are content hashes
computed in chunks of 1 MiB counted from the end (the SHA-256 of the chunks'
SHA-256s; an object of at most 1 MiB is hashed whole), so the tail's chunk
digests are known and only the head is hashed and written. Only whole chunks
count as unchanged (compared byte for byte with the last whole record, which
the process keeps in memory: at most 4 per directory), and a patch points at a
record of the same journal file, never at another patch; after a checkpoint the
next version is written whole. A patch is checked like any record (its header's
CRC, a digest of its head, and its tail inside an earlier record), and a read
or a checkpoint joins its head and tail.

A stage's history only grows, and its entries are immutable
(`StageStateHistoryEntry` is frozen), so the engine keeps the JSON of each
entry from one write of that stage to the next: a status change of a stage
with a long history serialises the stage without its history and splices the
kept entries in after its `attempts` member (the first such splice of each
pair of stage and state classes is compared with pydantic's own output; a
class with its own serialisers is always written by pydantic alone). The bytes
are exactly what `model_dump_json()` would give.

Why it is crash-safe: a write returns only after its batch is on disk; a
reader always sees the journal's newest record; the journal is deleted only
after every file it names is on disk, so a crash in the middle of a checkpoint
leaves the journal, which still holds the truth, and the next checkpoint
publishes it again. A batch that was cut short (a writer died mid-write, or a
power cut kept only some of its pages) counts for nothing: readers stop where
it starts and the next writer overwrites it; its surviving pieces never count,
because a batch must start with its first record. Damage in the middle (whole
batches after bytes that are not one) is refused with `CorruptStateError` and
left untouched. What you give up: between a crash and the next bind of that task, the
raw files in its directory may be older than the journal (the engine, the CLI
and every TaskIO read the journal first).

**Object stores (S3, GCS, Azure).** One PUT per status change, atomic by the
store's own guarantee. Under a lease each PUT is conditional on the version the
engine last wrote (`If-Match` / `ifGenerationMatch` / etag), taken from the
previous PUT's response, so a stage costs exactly two PUTs during execution
(RUNNING, COMPLETE) and no GET; creating a task costs one more PUT per stage
(its CREATED object).

**Memory.** One dict assignment under a process-wide lock.
"""


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def plot(results: dict[str, Any], path: Path) -> bool:
    scaling = results.get("scaling")
    if not scaling or "counts" not in scaling:
        return False
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for name, (color, marker, style) in PLOT_STYLE.items():
        counts = scaling["counts"].get(name, {})
        xs = sorted(int(k) for k in counts)
        ys = [med(counts[x]["marg"]) * 1e6 for x in xs]
        left.plot(xs, ys, color=color, marker=marker, linestyle=style, label=name)
        sizes = scaling["sizes"].get(name, {})
        xs = sorted(int(k) for k in sizes)
        ys = [med(sizes[x]["marg"]) * 1e3 for x in xs]
        right.plot([x / 1024 for x in xs], ys, color=color, marker=marker, linestyle=style)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("stages in the task (1 KB state)")
    left.set_ylabel("per-stage cost, µs (log)")
    left.set_title("vs number of stages")
    left.set_xticks([10, 100, 1000], ["10", "100", "1,000"])
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("state size per stage (5 stages)")
    right.set_ylabel("per-stage cost, ms (log)")
    right.set_title("vs state size")
    right.set_xticks([1, 100, 1024, 10240], ["1 KB", "100 KB", "1 MB", "10 MB"])
    from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: PLC0415

    for ax in (left, right):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(
            FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}")
        )
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    fig.legend(loc="upper center", ncol=3, frameon=False)
    fig.suptitle(
        "Durable per-stage cost on local disk "
        "(marginal: stage 1 entered -> stage N entered, / N-1)",
        y=0.02,
        fontsize=9,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _peers_table(results: dict[str, Any]) -> list[str]:
    peers = results.get("peers")
    if not peers or "rows" not in peers:
        return []
    import bench_peers  # noqa: PLC0415

    rows = peers["rows"]
    out = [
        f"{peers['rounds']} rounds, each contender in its own worker process per round "
        f"(the shared harness's `worker.py` through `benchmarks/peers/cm_worker.py`), "
        f"{peers['reps']} measured runs per N after 1 warm-up; the order rotates each round. "
        "Per stage = median wall / N; marginal = median (stage 1 entered -> stage N entered) "
        "/ (N-1); CPU = process CPU (all threads) / N. Ratios vs floor:fsync are paired per "
        "round, median. Resume = the 200-step pipeline failed at step 150, then the tool's "
        "resume path: call -> step 150 entered.",
        "",
        "| contender | what is persisted | N=20 per stage µs | N=200 per stage µs "
        "| N=200 marginal µs | N=200 CPU µs | wall vs floor:fsync | import s | resume ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [n for n in PEER_ORDER if n in rows] + [n for n in rows if n not in PEER_ORDER]:
        r = rows[name]
        ratio, _ = bench_peers.paired_ratio(peers, name, "floor:fsync", "wall200")
        out.append(
            f"| **{name}** | {r['note']} | {fmt_us(r.get('wall20', float('nan')))} "
            f"| {fmt_us(r.get('wall200', float('nan')))} "
            f"| {fmt_us(r.get('marg200', float('nan')))} "
            f"| {fmt_us(r.get('cpu200', float('nan')))} | {fmt_x(ratio)} | {r['import_s']:.3f} "
            f"| {fmt_ms(r.get('resume_s', float('nan')))} |"
        )
    if peers.get("errors"):
        out += ["", "Failed worker runs:", ""]
        out += [f"- {e.strip().splitlines()[-1] if e.strip() else e}" for e in peers["errors"]]
    cpu = results.get("engine_cpu")
    if cpu:
        out += [
            "",
            f"Engine CPU per stage on memory:// (T2): median of {cpu['samples']} paired "
            f"(N=200 CPU - N=20 CPU) / 180 samples from the checkmate:memory workers: "
            f"**{fmt_us(cpu['median_s'])} µs**.",
        ]
    return out


def _imports(results: dict[str, Any]) -> list[str]:
    imports = results.get("imports")
    if not imports or "checkmate" not in imports:
        return []
    out = [
        "Each `import X` timed inside a fresh interpreter (interpreter start not counted), "
        f"{len(imports['checkmate'])} samples per module, interleaved, after one uncounted pass.",
        "",
        "| module | median ms | min ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    for mod, xs in imports.items():
        out.append(f"| `{mod}` | {fmt_ms(med(xs))} | {fmt_ms(min(xs))} | {fmt_ms(max(xs))} |")
    out += [
        "",
        "`import langgraph` imports a namespace package (no code runs): the issue's wording "
        "makes T2's import target a comparison with an empty import. `langgraph.graph` is "
        "what a LangGraph program imports.",
    ]
    if "pydantic" in imports and "langgraph" in imports:
        pd, lg = med(imports["pydantic"]), med(imports["langgraph"])
        out += [
            "",
            f"`import pydantic` alone, a runtime dependency the issue requires, takes "
            f"{fmt_ms(pd)} ms: {fmt_x(pd / lg)} of `import langgraph` ({fmt_ms(lg)} ms). No "
            "library that imports pydantic at import time can reach 0.5x of that; checkmate "
            "imports pydantic's models at import time because its public classes are pydantic "
            "models.",
        ]
    one = imports.get(ONE_MODEL)
    if one and "langgraph" in imports and "checkmate" in imports:
        om, lg, cm = med(one), med(imports["langgraph"]), med(imports["checkmate"])
        out += [
            "",
            f"Importing pydantic and defining one model, the least any library whose public "
            f"classes are pydantic models pays, takes {fmt_ms(om)} ms ({fmt_x(om / lg)} of "
            f"`import langgraph`); `import checkmate` takes {fmt_ms(cm - om)} ms more.",
        ]
    return out


def _req(counts: dict[str, dict[str, int]]) -> str:
    if not counts:
        return "none"
    parts = []
    for category, methods in sorted(counts.items()):
        inner = ", ".join(f"{n} {m}" for m, n in sorted(methods.items()))
        parts.append(f"{category}: {inner}")
    return "; ".join(parts)


def _s3(results: dict[str, Any]) -> list[str]:
    s3 = results.get("s3")
    if not s3 or "task" not in s3:
        return [f"Not measured: {s3.get('error')}"] if s3 else []
    t, hb, b = s3["task"], s3["heartbeat"], s3["bind1000"]
    return [
        "A moto_server on 127.0.0.1 (a free port, stopped by PID at the end); the task's "
        "store is `FsspecTaskIO('s3://<bucket>/tasks', key=..., secret=..., "
        "client_kwargs={'endpoint_url': ...})`. Requests are counted from the **server's** "
        'access log (werkzeug lines `"PUT /bucket/key HTTP/1.1" 200`); each phase ends '
        "with a marker request. Attribution is by path: stage objects (`<task>/<stage>.json`), "
        "the lease object (`<task>/task~lock`), the one-per-process store self-test "
        "(`task~lock.selftest-*`), the cancellation check (`cancel~request`), listings.",
        "",
        "| phase | requests seen by the server |",
        "|---|---|",
        f"| bind of a new {t['stages']}-stage task (first in the process) | {_req(t['bind'])} |",
        f"| execute ({t['stages']} stages) | {_req(t['execute'])} |",
        f"| unbind | {_req(t['unbind'])} |",
        f"| execute of 1 stage holding the lease {hb['held_s']} s at lock_ttl={hb['lock_ttl']} s "
        f"(heartbeat every ttl/3: {hb['expected_beats']} expected) | {_req(hb['execute'])} |",
        f"| bind of an existing {b['stages']:,}-stage task | {_req(b['bind_requests'])} |",
        f"| `fs.cat` of its {b['stages']:,} objects | {_req(b['cat_requests'])} |",
        f"| `fs.cat(..., max_concurrency=1)` | {_req(b['cat_get_only_requests'])} |",
        "",
        f"Per successful stage of a new task: **{t['run_puts_per_stage']:g} PUTs** on its "
        f"object over the whole run (bind creates it CREATED with `If-None-Match: *`; then "
        f"RUNNING and COMPLETE, {t['puts_per_stage']:g} per stage during execute, each a "
        f"conditional `If-Match` PUT whose version comes from the previous PUT's response) and "
        f"**{t['run_gets_per_stage']:g} GETs**. Bind of {b['stages']:,} stages: "
        f"{b['bind_median_s']:.2f} s vs `fs.cat` {b['cat_median_s']:.2f} s "
        f"(**{fmt_x(b['ratio'])}**) and vs GET-only `fs.cat` {b['cat_get_only_median_s']:.2f} s "
        f"({fmt_x(b['ratio_get_only'])}); medians of {len(b['ratios'])} interleaved samples. "
        "s3fs's `cat` sends a HEAD (size) before each GET unless `max_concurrency=1`.",
    ]


def _scaling(results: dict[str, Any], img_rel: str | None) -> list[str]:
    scaling = results.get("scaling")
    if not scaling or "counts" not in scaling:
        return []
    out = []
    if img_rel:
        out += [f"![Per-stage cost vs number of stages and vs state size]({img_rel})", ""]
    out += [
        "In one process, interleaved: checkmate (`c_checkmate`, LocalTaskIO) and the shared "
        "floors (`c_floor`). Per stage: marginal (stage 1 entered -> stage N entered, / N-1) "
        "and wall / N (with the per-run bind, unbind and lease); `flush` = what was left of "
        "the journal checkpoint that checkmate's unbind starts in the background, waited for "
        "(`LocalTaskIO.flush`) outside the timings, per stage (about 0 when unbind already "
        "waited for it). Each contender runs its points back to back; medians over rounds.",
        "",
        "| stages | contender | marginal µs | wall / N µs | flush µs |",
        "|---:|---|---:|---:|---:|",
    ]
    for n in sorted({int(k) for c in scaling["counts"].values() for k in c}):
        for name, data in scaling["counts"].items():
            d = data.get(n) or data.get(str(n))
            flush = fmt_us(med(d["flush"])) if d["flush"] else "-"
            out.append(
                f"| {n:,} | {name} | {fmt_us(med(d['marg']))} | {fmt_us(med(d['wall']))} "
                f"| {flush} |"
            )
    out += [
        "",
        "| state per stage (5 stages) | contender | marginal ms | wall / N ms | flush ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for n in sorted({int(k) for c in scaling["sizes"].values() for k in c}):
        for name, data in scaling["sizes"].items():
            d = data.get(n) or data.get(str(n))
            flush = fmt_ms(med(d["flush"])) if d["flush"] else "-"
            out.append(
                f"| {_size(n)} | {name} | {fmt_ms(med(d['marg']))} | {fmt_ms(med(d['wall']))} "
                f"| {flush} |"
            )
    changes = results.get("changes") or {}
    if changes:
        out += [
            "",
            "One status change (`BaseStage.update_status`, RUNNING <-> RETRY on a bound stage) "
            "vs the floor's durable write of the same bytes (the object as checkmate wrote it: "
            "temp file, write, fsync, `os.replace` over the previous version), interleaved; "
            "ratio = sum over a round, median over rounds. The 1,000-entry history is built "
            "in memory (valid RUNNING/RETRY entries), then persisted once before timing; "
            "the changes add entries as they go.",
            "",
            "| state | object KiB | history entries | checkmate mean ms | median ms "
            "| floor mean ms | median ms | ratio |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for kind, c in changes.items():
            if "ratio" not in c:
                out.append(f"| {kind} | error: {c.get('error')} | | | | | | |")
                continue
            h0, h1 = c["history_entries"]
            out.append(
                f"| {kind} | {c['bytes'] / 1024:,.0f} | {h0:,} -> {h1:,} "
                f"| {fmt_ms(c['cm_mean_s'])} "
                f"| {fmt_ms(c['cm_median_s'])} | {fmt_ms(c['floor_mean_s'])} "
                f"| {fmt_ms(c['floor_median_s'])} | {fmt_x(c['ratio'])} |"
            )
    return out


def _resume(results: dict[str, Any]) -> list[str]:
    r = results.get("resume")
    if not r or "ratio" not in r:
        return []
    n = len(r["samples_s"]["floor"])
    return [
        f"A {r['stages']}-stage task whose last stage was interrupted ({r['complete']} COMPLETE, "
        "one RETRY), written by checkmate:local; the floor's 200 files written by floor:fsync "
        "(step 200 failed). Timed: `engine.bind()` (lease, sweep, listing, reading and "
        "validating the 200 stage objects) vs the floor's `recover` loop over 199 files "
        f"(read, `json.loads`, status check, `Payload.model_validate`). {n} interleaved "
        "samples after a warm-up, page cache warm for both.",
        "",
        "| | median ms | ratio vs floor |",
        "|---|---:|---:|",
        f"| bind, new LocalTaskIO (a new process: replays and checkpoints the journal left by "
        f"the last unbind) | {fmt_ms(r['fresh_s'])} | {fmt_x(r['ratio'])} |",
        f"| bind, the LocalTaskIO that wrote the task | {fmt_ms(r['warm_s'])} "
        f"| {fmt_x(r['ratio_warm'])} |",
        f"| floor: read 199 state files | {fmt_ms(r['floor_s'])} | 1.00x |",
    ]


def _cli_ls(results: dict[str, Any]) -> list[str]:
    ls = results.get("cli_ls")
    if not ls or not ls.get("runs"):
        return []
    out = []
    for run in ls["runs"]:
        if run["returncode"] == 0:
            out += [f"`python benchmarks/cli_ls.py --tasks {run['tasks']}`:", ""]
            out += run["table"]
            out += [""] + [f"- {note}" for note in run["notes"]]
        else:
            out += [
                f"`python benchmarks/cli_ls.py --tasks {run['tasks']}` failed after "
                f"{run['seconds']:.0f} s: `{run.get('error', '')}`",
                "",
            ]
    return out


def _profiles(results: dict[str, Any]) -> list[str]:
    prof = results.get("profiles")
    if not prof or "memory" not in prof:
        return []
    out = [
        "cProfile (its overhead included), 3 runs of 200 stages; per stage = per status "
        "change pair; top functions by own time.",
        "",
    ]
    phases = prof.get("phases")
    if phases:
        n = phases["stages"]
        out += [
            f"A new {n}-stage task on LocalTaskIO (1 KB payload), median of 3: "
            f"bind {fmt_ms(phases['bind'])} ms (lease + {n} CREATED objects, each written "
            f"durably), execute {fmt_ms(phases['execute'])} ms ({2 * n} status changes), "
            f"unbind {fmt_ms(phases['unbind'])} ms, then the background journal checkpoint "
            f"{fmt_ms(phases['flush'])} ms (waited for with `flush`).",
            "",
        ]
    for key, title, unit in (
        ("memory", "checkmate:memory, per stage", "µs"),
        ("local", "checkmate:local, per stage", "µs"),
        ("resume_bind", "resume bind (200 stages, new LocalTaskIO), per bind", "µs"),
    ):
        p = prof[key]
        head = f"**{title}**"
        if "wall_per_stage_s" in p:
            head += (
                f" (under the profiler: {fmt_us(p['wall_per_stage_s'])} µs wall, "
                f"{fmt_us(p['cpu_per_stage_s'])} µs CPU per stage)"
            )
        out += [
            head,
            "",
            f"| function | calls | own {unit} | cumulative {unit} |",
            "|---|---:|---:|---:|",
        ]
        for row in p["top"]:
            out.append(
                f"| `{row['function']}` | {row['calls_per_unit']:.1f} "
                f"| {fmt_us(row['tottime_per_unit_s'])} | {fmt_us(row['cumtime_per_unit_s'])} |"
            )
        out.append("")
    return out


def write(results: dict[str, Any], targets_table: str, doc: Path, img: Path) -> None:
    meta = results["meta"]
    m = meta["machine"]
    img_rel = None
    if plot(results, img):
        img_rel = os.path.relpath(img, doc.parent).replace(os.sep, "/")
    lines = [
        "# Performance",
        "",
        "<!-- Generated by benchmarks/bench.py (nox -s bench); edit the generator, not this "
        "file, except the Write design section. -->",
        "",
        "What a durable checkpoint costs per stage with checkmate, measured against the "
        "plain-Python floors and the peers (DBOS, LangGraph, Luigi) in the same run. Every "
        "figure is a ratio of two measurements taken in that run, interleaved, so that the "
        "drift of a shared machine falls on both sides.",
        "",
        f"- Run: {meta['started']}, {meta['mode']} mode (`nox -s bench`"
        f"{' -- --quick' if meta['mode'] == 'quick' else ''}), {meta['total_s'] / 60:.1f} min.",
        f"- Machine: {m['cpu']}, {m['nproc']} CPUs (`nproc`), {m['memory']}, Linux {m['kernel']}; "
        f"load average {meta['load_start']} at the start, {meta['load_end']} at the end "
        "(the machine is shared: other work ran meanwhile).",
        f"- checkmate at commit {m.get('commit', 'unknown')}; Python {m['python']}; "
        f"{m['versions']}.",
        "- Nothing a run wrote is deleted before the whole benchmark ends. This disk is "
        "ext4 without a journal, where creating a file skips every inode deleted in the "
        "last 60-360 s (`recently_deleted` in the kernel's inode allocator, seen with "
        "`perf`): right after thousands of deletions a file creation cost up to 600 µs "
        "instead of 30-50 µs, so a cleanup between runs landed in whatever was measured "
        "next. Contenders that create files (checkmate publishing one file per stage at "
        "unbind, the floors) pay it whenever deletions precede them, in this benchmark or "
        "in real use; a run started a minute or two after another run's cleanup (or the "
        "test suite's) is slowed the same way.",
        "",
        "## Targets (issue 5)",
        "",
        targets_table,
        "",
        "Rows marked *info* have no target of their own; they show the same figure "
        "measured another way.",
        "",
        "## Per-stage cost: checkmate and the peers (T1, T2)",
        "",
        *_peers_table(results),
        "",
        "Prefect is not in this run (its ephemeral server takes ~7.5 s to start and each "
        "flow has a ~1 s fixed cost); see `../shared/peer-bench/RESULTS.md`.",
        "",
        "## Import time (T2)",
        "",
        *_imports(results),
        "",
        "## Object storage: S3 through s3fs against moto (T3)",
        "",
        *_s3(results),
        "",
        "## Scaling with stages, state size and history (T4)",
        "",
        *_scaling(results, img_rel),
        "",
        "## Resume (T5)",
        "",
        *_resume(results),
        "",
        "## `checkmate ls` on 10,000 tasks",
        "",
        *_cli_ls(results),
        "",
        "## Where the time goes",
        "",
        *_profiles(results),
        "",
        WRITE_DESIGN,
        "## Reproduce",
        "",
        "```sh",
        "nox -s bench                      # full run (~10-15 min on 2 cores)",
        "nox -s bench -- --quick           # a shorter run",
        "python benchmarks/bench.py --parts t3 --no-docs   # one part (a Python with the deps)",
        "```",
        "",
        "`benchmarks/peers/cm_worker.py checkmate:local --reps 5 --resume 200:150` runs the "
        "checkmate contender alone through the shared harness's worker (any contender name "
        "of `../shared/peer-bench/README.md` works too).",
        "",
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
