"""What a detect run writes into its output folder.

    detections.csv    one row per input: name, ok, error, flags, score, anomalous, localized,
                      inliers and the seconds of every stage
    detections.json   the same with poses (w2c before and after refinement), retrieved db images and
                      refinement details
    overlays/*.png    query | render | anomaly map over the query (detect.write_overlays)
    maps.npz          names [N] and maps [N, S, S] float32, normalised with the run's map_range
                      (detect.save_maps; images that failed are left out)
    summary.json      counts, median and p95 seconds per stage, throughput, the run it used, device
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from splatpose.detect.overlays import write_overlay
from splatpose.run_info import environment_info
from splatpose.atomic_files import atomic_path, write_json_atomic

CSV_FIELDS = ["name", "ok", "error", "flags", "score", "anomalous", "localized", "num_inliers", "num_matches",
              "fallback", "source"]


def overlay_file_name(name: str) -> str:
    """"test/Burrs/003.png" -> "test__Burrs__003.png" (one flat folder, no collisions between folders)."""
    return Path(name).with_suffix(".png").as_posix().replace("/", "__")


class DetectionWriter:
    """Collects detections as they come and writes the files listed in the module docstring."""

    def __init__(self, out_dir: Path, detector):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.detector = detector
        self.records: list[dict] = []
        self.map_names: list[str] = []
        self.maps: list[np.ndarray] = []
        self.stage_names: list[str] = []

    def add(self, detection) -> None:
        record = detection.record()
        self.records.append(record)
        for stage in detection.times:
            if stage not in self.stage_names:
                self.stage_names.append(stage)
        if not detection.ok:
            return
        if self.detector.cfg.save_maps:
            self.map_names.append(detection.name)
            self.maps.append(detection.anomaly_map)
        if self.detector.cfg.write_overlays and detection.query is not None:
            caption = (f"{detection.name}  score {detection.score:.3f}"
                       + ("" if detection.localized else "  NOT LOCALIZED")
                       + (f"  [{', '.join(detection.flags)}]" if detection.flags else ""))
            write_overlay(self.out_dir / "overlays" / overlay_file_name(detection.name), detection.query,
                          detection.render, detection.anomaly_map, caption)
            detection.query = detection.render = None  # free the images once drawn

    def close(self, wall_seconds: float) -> dict:
        """Write every file; returns the summary."""
        self._write_csv(self.out_dir / "detections.csv")
        write_json_atomic(self.out_dir / "detections.json", self.records)
        if self.maps:
            np.savez_compressed(self.out_dir / "maps.npz", names=np.array(self.map_names), maps=np.stack(self.maps))
        summary = self.summary(wall_seconds)
        write_json_atomic(self.out_dir / "summary.json", summary)
        return summary

    def summary(self, wall_seconds: float) -> dict:
        ok = [r for r in self.records if r["ok"]]
        run = self.detector.run
        return {
            "run_dir": str(run.run_dir), "class": run.class_name, "map_range": list(run.map_range),
            "num_images": len(self.records), "num_ok": len(ok), "num_errors": len(self.records) - len(ok),
            "num_localized": sum(r["localized"] for r in ok),
            "num_flagged": sum(bool(r["flags"]) for r in self.records),
            "num_anomalous": None if self.detector.cfg.threshold is None else sum(bool(r["anomalous"]) for r in ok),
            "threshold": self.detector.cfg.threshold,
            "setup_seconds": round(self.detector.setup_seconds, 3),
            "warm_up_seconds": round(self.detector.warm_up_seconds, 3),
            "wall_seconds": round(wall_seconds, 3),
            "images_per_second": round(len(self.records) / wall_seconds, 3) if wall_seconds > 0 else None,
            "seconds_per_stage": {stage: _percentiles([r["times"].get(stage, 0.0) for r in ok])
                                  for stage in self.stage_names},
            "errors": {r["name"]: r["error"] for r in self.records if not r["ok"]},
            "environment": environment_info(self.detector.device),
        }

    def console_summary(self) -> str:
        ok = [r for r in self.records if r["ok"]]
        lines = [f"Detections: {len(ok)}/{len(self.records)} scored, "
                 f"{sum(r['localized'] for r in ok)} localized -> {self.out_dir}"]
        for record in self.records:
            if record["ok"]:
                lines.append(f"  {record['name']:<40} score {record['score']:.4f}"
                             + ("" if record["localized"] else "  not localized")
                             + (f"  [{', '.join(record['flags'])}]" if record["flags"] else ""))
            else:
                lines.append(f"  {record['name']:<40} ERROR {record['error']}")
        return "\n".join(lines)

    def _write_csv(self, path: Path) -> None:
        fields = CSV_FIELDS + [f"seconds_{stage}" for stage in self.stage_names]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for r in self.records:
                row = {k: r.get(k) for k in CSV_FIELDS}
                row["flags"] = ";".join(r["flags"])
                row["score"] = "" if r["score"] is None else f"{r['score']:.6f}"
                row.update({f"seconds_{s}": r["times"].get(s, "") for s in self.stage_names})
                writer.writerow(row)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p95": None}
    return {"median": round(float(np.median(values)), 6), "p95": round(float(np.percentile(values, 95)), 6)}
