"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard event files."""

import json
import math
import pathlib

from tensorboardX import SummaryWriter


class MetricWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled  # only one process of a multi-process run writes
        if enabled:
            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (see close())
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
