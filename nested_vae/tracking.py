"""A CSV tracker for accelerate (its GeneralTracker extension point; accelerate ships no CSV tracker)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


class CSVTracker(GeneralTracker):
    """Long-format ``step,name,value`` CSV, so metrics that start late (the GAN) need no schema."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.csv"
        self._handle = None  # opened on first use, on the main process only
        self._writer = None

    def _open(self):
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            self._handle = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in finish()
            self._writer = csv.writer(self._handle)
            if new:
                self._writer.writerow(["step", "name", "value"])
        return self._writer

    @property
    def tracker(self):
        return self._writer

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._open()
        (self.path.parent / "hparams.json").write_text(
            json.dumps(values, indent=2, default=str), encoding="utf-8"
        )

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        writer = self._open()
        for name, value in values.items():
            writer.writerow([step, name, value])
        self._handle.flush()

    @on_main_process
    def finish(self):
        if self._handle is not None:
            self._handle.close()
