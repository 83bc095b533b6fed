"""The shared peer harness's worker (``../shared/peer-bench/worker.py``), plus checkmate.

usage: python benchmarks/peers/cm_worker.py NAME[:VARIANT] [worker.py options]

Puts the shared harness and this directory on ``sys.path``, registers the
checkmate contender (`c_checkmate`) as ``checkmate`` and runs the shared
worker unchanged: ``checkmate:local``, ``checkmate:memory``, ``floor:fsync``,
``dbos:sqlite``, ``langgraph:sqlite_sync``, ... all run through the same code.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARED = os.environ.get("PEER_BENCH_DIR") or os.path.join(
    os.path.dirname(REPO), "shared", "peer-bench"
)

if __name__ == "__main__":
    sys.path[:0] = [SHARED, HERE]
    import worker

    worker.MODULES["checkmate"] = "c_checkmate"
    worker.main()
