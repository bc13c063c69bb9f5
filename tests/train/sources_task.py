"""A test-only task for ``data.sources`` runs: ``digits_mlp`` that records, per optimizer step, the task label
and the sample keys of every micro-batch in ``RUN/data_log.jsonl`` (one line per step; a resumed run appends
the steps it redoes, the last line of a step wins).

`command` is the ``mmoe`` command line with this task registered (run from the repository root, so the
worktree's packages are imported).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmoe.data import SourcedBatch
from mmoe.train.tasks import register_task
from vision.digits import DigitsTask


@register_task("digits_sources_test")
class SourcesDigitsTask(DigitsTask):
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.log_path = Path(ctx.run_dir) / "data_log.jsonl"
        self.seen: list = []

    def decode(self, sample: dict):
        x, y = super().decode(sample)
        return x, y, sample["__key__"], sample["__task__"]  # __task__: the source's label

    def loss(self, model, batch):
        assert isinstance(batch, SourcedBatch), type(batch)
        x, y, keys, labels = batch.data
        assert set(labels) == {batch.task}, (labels, batch.task)  # one source per batch
        self.seen.append([batch.source, batch.task, list(keys)])
        return super().loss(model, (x, y))

    def after_step(self, model, step: int) -> None:
        super().after_step(model, step)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, "batches": self.seen}) + "\n")
        self.seen = []


def command(args: list[str]) -> list[str]:
    """``mmoe ARGS`` in a fresh interpreter that has imported this module first."""
    here = str(Path(__file__).resolve().parent)
    code = (f"import sys; sys.path.insert(1, {here!r}); import sources_task; from mmoe.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *args]
