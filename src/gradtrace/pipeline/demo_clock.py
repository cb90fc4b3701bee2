"""What both demos share: each stage timed and announced, and the closing summary written beside the outputs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from gradtrace.io import versions, write_json_atomic


class DemoClock:
    def __init__(self, log: Callable[[str], None], progress: bool):
        self.log, self.progress = log, progress
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def stage(self, name: str, fn, spec):
        """Run one pipeline stage `fn(spec)`, logging its name and recording its wall time."""
        t = time.perf_counter()
        self.log(f"[demo] {name} ...")
        result = fn(spec, progress=self.progress)
        self.timings[name] = round(time.perf_counter() - t, 2)
        return result

    def finish(self, out: Path, summary: dict, doc: dict, first_query: str) -> dict:
        """Write demo.json (the summary with timings, outputs and versions) and log the first query's top ids."""
        self.timings["total"] = round(time.perf_counter() - self.start, 2)
        summary = {**summary, "timings_s": self.timings,
                   "outputs": {"attributions": str(out / "attributions.json"), "report": str(out / "report.png"),
                               "learned": str(out / "learned" / "attributions.json"),
                               "html": str(out / "report.html")},
                   "versions": versions()}
        write_json_atomic(out / "demo.json", summary)
        first = doc["queries"][0]
        self.log(f"[demo] {first_query}: top training ids {[t['train_id'] for t in first['top']]}")
        self.log(f"[demo] done in {self.timings['total']:.1f} s: open {out / 'report.html'} in a browser "
                 f"(uniform and learned weights side by side)")
        return summary
