"""A flaky stage, retried under ``RetryPolicy.STAGE``, whose rollback undoes partial output.

Run it with ``python examples/etl_retry_rollback.py``. The pipeline has three
stages:

1. ``extract`` makes 12 order rows;
2. ``transform`` writes them as 4 CSV part files into an output directory; on
   its first attempt the "upstream" fails after two parts, so
   ``rollback_stage`` deletes the partial files before the engine retries;
3. ``load`` reads the parts back and sums them into the task's result.

The engine prints every status change through ``state_update_hook``. At the
end the script lists the output directory (exactly 4 parts, no leftovers)
and prints the persisted stages with ``dump_stages``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from checkmate import BaseStage, BaseStageState, CheckMateEngine, LocalTaskIO, RetryPolicy

TASK_ID = "orders-2026-11-22"
ROWS_PER_PART = 3


class Summary(BaseModel):
    """What the task produces."""

    parts: int = 0
    rows: int = 0
    total_cents: int = 0


class EtlState(BaseStageState[Summary]):
    """The state of every stage, persisted at each status change."""

    rows: list[int] = Field(default_factory=list)
    """Order amounts in cents."""
    parts: list[str] = Field(default_factory=list)
    """Names of the part files written by ``transform``."""


class Extract(BaseStage[EtlState]):
    """Stage 1: fetch the orders (here: make them up)."""

    def execute_stage(self, previous_state_copy: EtlState) -> None:
        self.state.rows = [1250 * (n + 1) for n in range(12)]


class Transform(BaseStage[EtlState]):
    """Stage 2: write the rows as CSV parts; fails once, half-way through."""

    out_dir: str
    fail_on_attempt: int = 1
    """The attempt that fails after writing two parts (0: never fail)."""

    def parts_dir(self) -> Path:
        """The directory this stage owns: everything in it is this stage's output."""
        return Path(self.out_dir) / "parts"

    def execute_stage(self, previous_state_copy: EtlState) -> None:
        rows = previous_state_copy.rows
        self.state.rows = rows
        self.parts_dir().mkdir(parents=True, exist_ok=True)
        for number, start in enumerate(range(0, len(rows), ROWS_PER_PART)):
            if number == 2 and self.state.attempts == self.fail_on_attempt:
                raise ConnectionError("upstream closed the connection after part 2")
            part = self.parts_dir() / f"part-{number:03d}.csv"
            chunk = rows[start : start + ROWS_PER_PART]
            part.write_text("".join(f"{amount}\n" for amount in chunk))
            self.state.parts.append(part.name)

    def rollback_stage(self) -> None:
        # Undo from what is on disk, not from memory: after a crash this runs
        # in a new process (execute(strict_recovery=True)), where the list of
        # parts written by the dead attempt was never persisted.
        removed = sorted(path.name for path in self.parts_dir().glob("part-*.csv"))
        for name in removed:
            (self.parts_dir() / name).unlink()
        self.state.parts = []
        print(f"   transform.rollback_stage(): removed {', '.join(removed) or 'nothing'}")


class Load(BaseStage[EtlState]):
    """Stage 3: read the parts back and sum them."""

    out_dir: str

    def execute_stage(self, previous_state_copy: EtlState) -> None:
        amounts: list[int] = []
        for name in previous_state_copy.parts:
            text = (Path(self.out_dir) / "parts" / name).read_text()
            amounts.extend(int(line) for line in text.split())
        self.state.parts = previous_state_copy.parts
        self.state.result = Summary(
            parts=len(previous_state_copy.parts), rows=len(amounts), total_cents=sum(amounts)
        )


class PrintingEngine(CheckMateEngine[BaseStage[EtlState], Summary]):
    """An engine that prints each persisted status change."""

    def state_update_hook(self, stage: BaseStage[Any]) -> None:
        entry = stage.state.history[-1]
        print(
            f"   {stage.stage_name:<9} {entry.begin_status} -> {entry.end_status}: {entry.message}"
        )


def build_engine(store: str, out_dir: str) -> PrintingEngine:
    """The task: the same id and stages whenever it runs."""
    return PrintingEngine(
        LocalTaskIO(store),
        task_id=TASK_ID,
        stage_templates=[
            Extract(stage_name="extract", state=EtlState()),
            Transform(stage_name="transform", state=EtlState(), out_dir=out_dir),
            Load(stage_name="load", state=EtlState(), out_dir=out_dir),
        ],
        retry_policy=RetryPolicy.STAGE,  # each stage may run up to max_attempts times
        max_attempts=3,
    )


def main() -> int:
    """Run the task once, then show the output files and the persisted stages."""
    work = Path(tempfile.mkdtemp(prefix="checkmate-etl-"))
    store, out_dir = work / "state", work / "output"
    print(f"state is kept in {store}, output goes to {out_dir}")
    print("1. run the task (status changes as the engine persists them):")
    engine = build_engine(str(store), str(out_dir))
    status = engine.execute()
    print(f"2. the engine returned {status}; result: {engine.task_result!r}")
    parts = sorted(path.name for path in (out_dir / "parts").iterdir())
    print(f"3. output files: {', '.join(parts)}")
    with engine:
        transform = engine.stages[1]
        print(f"   transform ran {transform.state.attempts} times")
        assert engine.check_sync()  # what is in memory is what is in storage
        print()
        print(engine.dump_stages("persistence", color="", basenames_only=True))
    ok = status.value == "COMPLETE" and len(parts) == 4 and transform.state.attempts == 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
