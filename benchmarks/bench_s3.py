"""T3: object storage. checkmate on s3:// (s3fs) against a local moto_server.

Requests are counted by the server: moto_server (werkzeug) writes one access line
per request on its stderr (``"PUT /bucket/key HTTP/1.1" 200``), which goes to a
log file. Each phase ends with a marker request; the lines before the marker are
the phase's requests. Every request is attributed from its path to a stage
object, the task's lock (lease) object, the store self-test, the cancellation
check, a listing, or other.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from bench_util import add_harness_paths, log, med, now

add_harness_paths()

from c_checkmate import make_stages  # noqa: E402
from common import make_payload  # noqa: E402

from checkmate import (  # noqa: E402
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    FsspecTaskIO,
    StageStatus,
)

LINE_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
START_DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Moto:
    """moto_server on 127.0.0.1, a free port; its request log in a temp file; stopped by PID."""

    def __init__(self) -> None:
        exe = Path(sys.executable).parent / "moto_server"
        found = str(exe) if exe.exists() else shutil.which("moto_server")
        if not found:
            raise RuntimeError("moto_server not found (pip install 'moto[server]')")
        self.exe = found
        self.workdir = Path(tempfile.mkdtemp(prefix="checkmate-bench-moto-"))
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._offset = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(3):  # a free port can be taken between the probe and the bind
            self.port = _free_port()
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    [self.exe, "-H", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            deadline = time.monotonic() + START_DEADLINE
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                        self.mark()
                        return
                except urllib.error.HTTPError:
                    self.mark()
                    return
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"moto_server did not start:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass
        self.mark()

    def mark(self) -> list[tuple[str, str, int]]:
        """End a phase: send a marker request; return the (method, target, status) before it."""
        token = uuid.uuid4().hex
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(f"{self.endpoint}/moto-api/?bench-mark={token}", timeout=10)
        deadline = time.monotonic() + 10
        while True:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            pos = chunk.find(token.encode())
            if pos >= 0:
                end = chunk.find(b"\n", pos)
                end = len(chunk) if end < 0 else end + 1
                self._offset += end
                text = chunk[:pos].decode(errors="replace")
                break
            if time.monotonic() > deadline:
                raise RuntimeError("moto_server did not log the marker request")
            time.sleep(0.01)
        out = []
        for line in text.splitlines():
            m = LINE_RE.search(line)
            if m and not m["target"].startswith("/moto-api/"):
                out.append((m["method"], m["target"], int(m["status"])))
        return out


def classify(target: str, bucket: str) -> str:
    """What a request touched, from its path."""
    path, _, query = target.partition("?")
    key = unquote(path[len(f"/{bucket}") :].lstrip("/"))
    if not key:
        prefix = parse_qs(query).get("prefix", [""])[0]
        return "cancel check" if "cancel~request" in prefix else "list"
    base = key.rsplit("/", 1)[-1]
    if ".selftest-" in base:
        return "store self-test"
    if base == "task~lock":
        return "lock"
    if base == "cancel~request":
        return "cancel check"
    if base.endswith(".json"):
        return "stage"
    return "other"


def count(requests: list[tuple[str, str, int]], bucket: str) -> dict[str, dict[str, int]]:
    """{category: {method: count}}."""
    out: dict[str, Counter[str]] = {}
    for method, target, _status in requests:
        out.setdefault(classify(target, bucket), Counter())[method] += 1
    return {k: dict(v) for k, v in out.items()}


def _phase(moto: Moto, bucket: str, func: Callable[[], Any]) -> tuple[Any, float, dict]:
    moto.mark()
    t0 = now()
    result = func()
    seconds = now() - t0
    return result, seconds, count(moto.mark(), bucket)


class _HoldState(BaseStageState[Any]):
    pass


class Hold(BaseStage[_HoldState]):
    hold_s: float = 0.0

    def execute_stage(self, previous_state_copy: _HoldState) -> None:
        time.sleep(self.hold_s)


def measure(quick: bool) -> dict[str, Any]:
    moto = Moto()
    moto.start()
    try:
        return _measure(moto, quick)
    finally:
        moto.cleanup()


def _measure(moto: Moto, quick: bool) -> dict[str, Any]:
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    moto.create_bucket(bucket)
    io = FsspecTaskIO(f"s3://{bucket}/tasks", **moto.storage_options())
    payload = make_payload()
    result: dict[str, Any] = {"endpoint": "moto_server on 127.0.0.1", "bucket": bucket}

    # 1. one task of N stages: bind, execute, unbind, each phase counted apart.
    n = 20
    engine = CheckMateEngine(io, task_id="t3-stages", stage_templates=make_stages(n, payload))
    _, bind_s, bind_req = _phase(moto, bucket, engine.bind)
    status, exec_s, exec_req = _phase(moto, bucket, engine.execute)
    assert status is StageStatus.COMPLETE, status
    _, unbind_s, unbind_req = _phase(moto, bucket, engine.unbind)
    stage_req = exec_req.get("stage", {})
    result["task"] = {
        "stages": n,
        "bind": bind_req,
        "execute": exec_req,
        "unbind": unbind_req,
        "seconds": {"bind": bind_s, "execute": exec_s, "unbind": unbind_s},
        "puts_per_stage": stage_req.get("PUT", 0) / n,
        "gets_per_stage": (stage_req.get("GET", 0) + stage_req.get("HEAD", 0)) / n,
        # the whole run of a new task: bind writes every stage object (CREATED) first
        "run_puts_per_stage": sum(
            phase.get("stage", {}).get("PUT", 0) for phase in (bind_req, exec_req, unbind_req)
        )
        / n,
        "run_gets_per_stage": sum(
            phase.get("stage", {}).get(m, 0)
            for phase in (bind_req, exec_req, unbind_req)
            for m in ("GET", "HEAD")
        )
        / n,
        "other_stage_requests": {
            k: v for k, v in stage_req.items() if k not in ("PUT", "GET", "HEAD")
        },
    }
    log(f"  T3 {n}-stage task: execute {exec_req}")

    # 2. heartbeats: one stage that holds the lease for a while with a short ttl.
    ttl, hold = 1.5, 2.2
    engine = CheckMateEngine(
        io,
        task_id="t3-heartbeat",
        stage_templates=[Hold(stage_name="hold", hold_s=hold, state=_HoldState())],
        lock_ttl=ttl,
    )
    _, _, hb_bind = _phase(moto, bucket, engine.bind)
    _, _, hb_exec = _phase(moto, bucket, engine.execute)
    _, _, hb_unbind = _phase(moto, bucket, engine.unbind)
    result["heartbeat"] = {
        "lock_ttl": ttl,
        "held_s": hold,
        "expected_beats": int(hold // (ttl / 3)),
        "bind": hb_bind,
        "execute": hb_exec,
        "unbind": hb_unbind,
    }
    log(f"  T3 heartbeat: execute {hb_exec}")

    # 3. bind of an existing 1,000-stage task (all CREATED) vs one fs.cat of its objects.
    big = 1000
    templates = make_stages(big, payload)
    task_id = "t3-bind1000"
    creator = CheckMateEngine(io, task_id=task_id, stage_templates=templates)
    t0 = now()
    creator.bind()
    creator.unbind()
    log(f"  T3 created a {big}-stage task in {now() - t0:.1f}s")
    root = f"{bucket}/tasks/{task_id}"
    paths = [f"{root}/{s.stage_name}.json" for s in templates]
    fs = io.fs
    samples: dict[str, list[float]] = {"bind": [], "cat": [], "cat_get_only": []}
    requests: dict[str, dict] = {}
    reps = 2 if quick else 5
    for rep in range(reps):
        engine = CheckMateEngine(io, task_id=task_id, stage_templates=templates)

        def do_bind(engine: CheckMateEngine = engine) -> None:
            engine.bind()

        def do_cat() -> None:
            # fsspec's batched read; s3fs sends a HEAD (size) before each GET
            assert len(fs.cat(paths)) == big

        def do_cat_get_only() -> None:
            # the same without the HEADs: one GET per object
            assert len(fs.cat(paths, max_concurrency=1)) == big

        order = [("bind", do_bind), ("cat", do_cat), ("cat_get_only", do_cat_get_only)]
        k = rep % len(order)
        for label, func in order[k:] + order[:k]:
            _, seconds, requests[label] = _phase(moto, bucket, func)
            samples[label].append(seconds)
            if label == "bind":
                assert engine.status is StageStatus.CREATED
                engine.unbind()
    ratios = [b / c for b, c in zip(samples["bind"], samples["cat"], strict=True)]
    ratios_get = [b / c for b, c in zip(samples["bind"], samples["cat_get_only"], strict=True)]
    binds, cats = samples["bind"], samples["cat"]
    result["bind1000"] = {
        "stages": big,
        "samples_s": samples,
        "ratios": ratios,
        "ratio": med(ratios),
        "ratio_get_only": med(ratios_get),
        "bind_median_s": med(binds),
        "cat_median_s": med(cats),
        "cat_get_only_median_s": med(samples["cat_get_only"]),
        "bind_requests": requests["bind"],
        "cat_requests": requests["cat"],
        "cat_get_only_requests": requests["cat_get_only"],
    }
    log(f"  T3 bind {big}: {med(binds):.3f}s vs cat {med(cats):.3f}s -> {med(ratios):.2f}x")
    return result
