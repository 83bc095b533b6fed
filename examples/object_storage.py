"""The ETL pipeline on an object store given by URL: S3, MinIO, GCS, Azure, or memory.

Run it with::

    python examples/object_storage.py                        # memory://, runs anywhere
    python examples/object_storage.py s3://my-bucket/checkmate
    python examples/object_storage.py s3://demo/checkmate \\
        --storage-option endpoint_url=http://127.0.0.1:9000 \\
        --storage-option key=minioadmin --storage-option secret=minioadmin

``--storage-option KEY=VALUE`` (``-o``, repeatable) is passed to the fsspec
filesystem; the value is parsed as JSON when it can be, so
``-o 'client_kwargs={"region_name": "eu-west-1"}'`` gives a dict. Object
stores need their extra: ``pip install "checkmate-engine[s3]"`` (or
``[gcs]``, ``[azure]``).

What it does: the task's stage objects and its output (CSV parts, under
``exports/<task_id>/``) go to the same store. ``transform`` fails once after
writing two parts; its ``rollback_stage`` deletes them and the engine
retries it. Then the worker is stopped (a ``KeyboardInterrupt`` inside
``load``, as Ctrl-C would) and a second engine resumes the task from
storage: ``extract`` and ``transform`` do not run again. Finally it runs
``checkmate ls`` and ``checkmate history`` on the store, and deletes what it
wrote (``--keep`` keeps it, to look at with the CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from pydantic import BaseModel, Field

from checkmate import BaseStage, BaseStageState, CheckMateEngine, FsspecTaskIO, RetryPolicy, TaskIO
from checkmate.cli import main as checkmate_cli

ROWS_PER_PART = 3


class Summary(BaseModel):
    """What the task produces."""

    parts: int = 0
    rows: int = 0
    total_cents: int = 0


class EtlState(BaseStageState[Summary]):
    """The state of every stage, persisted at each status change."""

    rows: list[int] = Field(default_factory=list)
    parts: list[str] = Field(default_factory=list)


def exports_prefix(stage: BaseStage[Any]) -> str:
    """Where the task's output objects go, in the engine's store."""
    return f"exports/{stage.engine.task_id}/"


class Extract(BaseStage[EtlState]):
    """Stage 1: fetch the orders (here: make them up)."""

    def execute_stage(self, previous_state_copy: EtlState) -> None:
        self.state.rows = [1250 * (n + 1) for n in range(12)]


class Transform(BaseStage[EtlState]):
    """Stage 2: write CSV parts to the store; the first attempt fails after two parts."""

    def execute_stage(self, previous_state_copy: EtlState) -> None:
        io = self.engine.io  # the bound engine's store
        rows = previous_state_copy.rows
        self.state.rows = rows
        for number, start in enumerate(range(0, len(rows), ROWS_PER_PART)):
            if number == 2 and self.state.attempts == 1:
                raise ConnectionError("upstream closed the connection after part 2")
            name = f"{exports_prefix(self)}part-{number:03d}.csv"
            chunk = rows[start : start + ROWS_PER_PART]
            io.write(name, "".join(f"{amount}\n" for amount in chunk).encode())
            self.state.parts.append(name)

    def rollback_stage(self) -> None:
        # Undo from what is in the store: after a crash this runs in another
        # process, which never saw the names the dead attempt wrote.
        io = self.engine.io
        removed = io.list(exports_prefix(self))
        for name in removed:
            io.delete(name)
        self.state.parts = []
        print(f"   transform.rollback_stage(): deleted {len(removed)} partial part(s)")


class Load(BaseStage[EtlState]):
    """Stage 3: read the parts back and sum them; ``stop`` simulates Ctrl-C."""

    stop: bool = False

    def execute_stage(self, previous_state_copy: EtlState) -> None:
        if self.stop:
            raise KeyboardInterrupt  # the worker is stopped in the middle of the stage
        io = self.engine.io
        blobs = io.read_many(previous_state_copy.parts)  # one batched call on object stores
        amounts = [int(line) for name in previous_state_copy.parts for line in blobs[name].split()]
        self.state.parts = previous_state_copy.parts
        self.state.result = Summary(parts=len(blobs), rows=len(amounts), total_cents=sum(amounts))


class PrintingEngine(CheckMateEngine[BaseStage[EtlState], Summary]):
    """An engine that prints each persisted status change."""

    def state_update_hook(self, stage: BaseStage[Any]) -> None:
        entry = stage.state.history[-1]
        print(
            f"   {stage.stage_name:<9} {entry.begin_status} -> {entry.end_status}: {entry.message}"
        )


def build_engine(io: TaskIO, task_id: str, stop: bool) -> PrintingEngine:
    """The task: the same id and stages in every run."""
    return PrintingEngine(
        io,
        task_id=task_id,
        stage_templates=[
            Extract(stage_name="extract", state=EtlState()),
            Transform(stage_name="transform", state=EtlState()),
            Load(stage_name="load", state=EtlState(), stop=stop),
        ],
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
    )


def storage_option(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE``; VALUE is JSON when it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid storage option {text!r}: use KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: ``[URL] [--storage-option KEY=VALUE ...] [--keep]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "url",
        nargs="?",
        default=f"memory://checkmate-example-{uuid.uuid4().hex[:8]}",
        help="root URL of the store (default: a fresh memory:// store)",
    )
    parser.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        type=storage_option,
        metavar="KEY=VALUE",
        help="an fsspec storage option (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the task's objects")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline on the store, stop it once, resume it, show it with the CLI."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = dict(args.storage_option)
    io = FsspecTaskIO(args.url, **options)
    task_id = f"orders-{uuid.uuid4().hex[:8]}"  # a new task on every run of the script
    print(f"store: {io!r}")
    print(
        f"   atomic create: {io.supports_atomic_create}, "
        f"compare-and-swap: {io.supports_conditional_write}"
    )
    print(f"1. run task {task_id}; the worker is stopped inside 'load':")
    try:
        build_engine(io, task_id, stop=True).execute()
    except KeyboardInterrupt:
        print("   KeyboardInterrupt: the worker stopped")
    print("2. a new engine resumes the task from the store:")
    engine = build_engine(io, task_id, stop=False)
    print(f"   status found in the store: {engine.status}")
    status = engine.execute(strict_recovery=True)
    print(f"   the engine returned {status}; result: {engine.task_result!r}")
    with engine:
        assert engine.check_sync()
        attempts = {stage.stage_name: stage.state.attempts for stage in engine.stages}
    print(f"   attempts per stage: {attempts}")
    print(f"   output objects: {io.list(f'exports/{task_id}/')}")
    cli_options = [f"--storage-option={key}={json.dumps(value)}" for key, value in options.items()]
    print(f"3. $ checkmate ls {args.url}")
    checkmate_cli(["ls", args.url, *cli_options])
    print(f"4. $ checkmate history {args.url} {task_id}")
    checkmate_cli(["history", args.url, task_id, *cli_options])
    if not args.keep:
        with engine:
            engine.unbind(clean=True)  # the task's stage objects and lock
        for name in io.list(f"exports/{task_id}/"):
            io.delete(name)
        print(f"5. deleted task {task_id} and its output (--keep keeps them)")
    ok = status.value == "COMPLETE" and attempts == {"extract": 1, "transform": 2, "load": 1}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
