"""Export a run's whole batch order to Parquet (step, row, input_ids), as Ettin released it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ettin.errors import EttinError
from ettin.fsutil import atomic_write_bytes
from ettin.train.schedule import Plan
from ettin.train.trainer import open_mixture, run_stages_of


def export_order(run: Path, out: Path, *, max_steps: int | None = None) -> int:
    """Write every step's rows; streams step by step so memory stays bounded."""
    stages, _ = run_stages_of(run)
    plan = Plan(stages)
    total = plan.total_steps() if max_steps is None else min(max_steps, plan.total_steps())
    out = Path(out)
    if out.suffix != ".parquet":
        raise EttinError(f"{out}: the export must be a .parquet file")
    tmp = out.with_name(f".{out.name}.tmp")
    schema = pa.schema([("step", pa.int64()), ("stage", pa.string()), ("row", pa.int64()), ("input_ids", pa.list_(pa.int32()))])
    mixes = {}
    n = 0
    try:
        with pq.ParquetWriter(str(tmp), schema) as w:
            for step in range(1, total + 1):
                p = plan.get(step)
                if p.stage_index not in mixes:
                    mixes[p.stage_index] = open_mixture(stages[p.stage_index])
                ids, _ = mixes[p.stage_index].rows(p.start_row, p.rows)
                ids = np.asarray(ids, dtype=np.int32)
                tbl = pa.table(
                    {
                        "step": np.full(len(ids), step, dtype=np.int64),
                        "stage": [stages[p.stage_index].name] * len(ids),
                        "row": np.arange(p.start_row, p.start_row + len(ids), dtype=np.int64),
                        "input_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
                    },
                    schema=schema,
                )
                w.write_table(tbl)
                n += len(ids)
        atomic_write_bytes(out, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return n
