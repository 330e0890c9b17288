"""The HTML report: the writer on a small synthetic run (fast, no browser), the sweep report, and the
report of a real run (tests/conftest.py's ``tiny_run``) opened in headless Chromium.

The browser test needs a ``chromium`` binary (Debian's package: .ci/system-packages installs it); on a
machine without one it is skipped, saying so.
"""

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splatpose.metrics import evaluate, image_scores
from splatpose.report import (CURVES_NAME, REPORT_NAME, compute_curves, gallery_order, load_curves, main,
                              save_curves, write_run_report, write_sweep_report)
from splatpose.sweeps.sweep_jobs import FAILED, OK, JobRecord
from splatpose.sweeps.sweep_table import build_rows

DATA_URI = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")
PER_IMAGE_FIELDS = ["name", "defect", "label", "score", "localized", "fallback", "num_inliers", "rotation_error_deg",
                    "center_error_rel", "pose_path", "iou", "refined", "final_rotation_error_deg",
                    "final_center_error_rel"]


def synthetic_maps(seed: int = 0):
    """8 images of 32x32: 4 good, 2 'Burrs', 2 'Stains'; defects are bright squares, plus noise. One good
    image has a bright blob (a false positive) and one Stains defect is faint (a false negative)."""
    rng = np.random.default_rng(seed)
    defects = ["good"] * 4 + ["Burrs"] * 2 + ["Stains"] * 2
    maps = rng.uniform(0, 0.3, (8, 32, 32)).astype(np.float32)
    masks = np.zeros((8, 32, 32), bool)
    for i in range(4, 8):
        masks[i, 10:16, 10:16] = True
        maps[i, 10:16, 10:16] += 0.6
    maps[7] = 0.1  # the faint defect: flat, and lower than the noise of the good images
    maps[7, 10:16, 10:16] = 0.2
    maps[0, 20:24, 20:24] = 0.95  # the good image that looks defective
    return maps, masks, defects


def make_run_folder(run_dir: Path) -> dict:
    """A finished run's folder as the pipeline writes it: results.json, per_image.csv, panels/, curves.npz."""
    maps, masks, defects = synthetic_maps()
    labels = np.array([d != "good" for d in defects], dtype=np.int64)
    scores = image_scores(maps)
    names = [f"test/{d}/{i:03d}.png" for i, d in enumerate(defects)]
    per_query = {n: {"path": "pnp", "lines_up": i != 5, "refined": True, "rotation_error_deg": 0.1 + 0.2 * i}
                 for i, n in enumerate(names)}
    results = {"status": "ok", "dataset": "synthetic", "class": "01Ant", "device": "cpu",
               "metrics": evaluate(maps, masks, labels, defects), "map_range": [0.01, 12.5],
               "localization": {"num_queries": 8, "num_localized": 8,
                                "per_query": {n: {"success": True, "rotation_error_deg": 0.3} for n in names}},
               "final_poses": {"paths": {"failed": 1, "pnp": 7, "recovered": 0}, "per_query": per_query,
                               "not_lined_up": 1, "median_rotation_error_deg": 0.8, "within_1deg_rate": 0.5},
               "timings": {"data": {"seconds": 0.5, "reused": False}, "sfm": {"seconds": 60.0, "reused": True},
                           "score": {"seconds": 2.0, "reused": False}, "total": {"seconds": 62.5}},
               "config": {"paths": {"output_dir": str(run_dir)}, "detect": {"threshold": None}},
               "environment": {"device_name": "cpu", "date": "today", "git_commit": "abc1234"}}
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results, sort_keys=True))
    with open(run_dir / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_IMAGE_FIELDS)
        writer.writeheader()
        for i, name in enumerate(names):
            writer.writerow({"name": name, "defect": defects[i], "label": int(labels[i]), "score": f"{scores[i]:.6f}",
                             "pose_path": "pnp", "final_rotation_error_deg": 0.1 + 0.2 * i})
            panel = run_dir / "panels" / defects[i] / f"{i:03d}.png"
            panel.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.full((20, 80, 3), 30 * i, np.uint8))).save(panel)
    save_curves(run_dir / CURVES_NAME, compute_curves(maps, masks, defects, scores))
    return {"results": results, "names": names, "scores": scores, "labels": labels}


def test_run_report_has_the_metrics_the_worst_mistakes_first_and_only_embedded_images(tmp_path):
    run = make_run_folder(tmp_path / "run")
    path = write_run_report(tmp_path / "run")
    assert path == tmp_path / "run" / REPORT_NAME
    text = path.read_text()
    metrics = run["results"]["metrics"]

    def percent(value):
        return f"{100 * value:.1f}"

    assert (f"<tr><td>All</td><td>{percent(metrics['pixel_auroc'])}</td><td>{percent(metrics['aupro'])}</td>"
            f"<td>{percent(metrics['image_auroc'])}</td></tr>") in text
    for defect in ("Burrs", "Stains"):
        values = metrics["per_defect"][defect]
        assert f"<tr><td>{defect}</td><td>{percent(values['pixel_auroc'])}</td>" in text
    for section in ("ROC and PRO curves", "Per defect type", "Poses", "Time per stage", "Per-image panels"):
        assert f"<h2>{section}</h2>" in text
    assert "<dt>Not lined up (maps doubtful)</dt><dd>test/Burrs/005.png</dd>" in text
    assert "No curves" not in text

    # gallery: the good image with the bright blob (a false positive) first, then the faint Stains defect
    captions = re.findall(r"<figcaption><b>(\w*)</b> (\S+) ", text)
    assert captions[0] == ("FP", "test/good/000.png")
    assert captions[1] == ("FN", "test/Stains/007.png")
    assert {outcome for outcome, _ in captions[2:]} <= {"TP", "TN"}
    rest_scores = [run["scores"][run["names"].index(name)] for _, name in captions[2:]]
    assert rest_scores == sorted(rest_scores, reverse=True)
    assert len(captions) == 8

    # self-contained: every src is a data URI of a decodable PNG, nothing else is loaded
    sources = re.findall(r"""src=["']?([^"' >]*)""", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(script|link|iframe)\b", text) and "url(" not in text
    for payload in DATA_URI.findall(text):
        Image.open(io.BytesIO(base64.b64decode(payload))).verify()
    assert len(DATA_URI.findall(text)) == len(sources) == 8 + 5  # panels + curves, bars, poses, times, scale


def test_report_of_a_run_without_curves_or_panels_still_renders_and_the_cli_rewrites_it(tmp_path, capsys):
    make_run_folder(tmp_path / "run")
    (tmp_path / "run" / CURVES_NAME).unlink()
    shutil.rmtree(tmp_path / "run" / "panels")
    main([str(tmp_path / "run")])
    assert f"Report: {(tmp_path / 'run' / REPORT_NAME).resolve()}" in capsys.readouterr().out
    text = (tmp_path / "run" / REPORT_NAME).read_text()
    assert "No curves" in text and text.count("no panel") == 8
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path)])


def test_curves_agree_with_the_metrics_and_survive_saving(tmp_path):
    maps, masks, defects = synthetic_maps()
    labels = np.array([d != "good" for d in defects])
    curves = compute_curves(maps, masks, defects, image_scores(maps))
    metrics = evaluate(maps, masks, labels, defects)
    assert {k.rsplit("/", 1)[0] for k in curves} == {f"{kind}/{subset}" for kind in ("pixel_roc", "pro", "image_roc")
                                                     for subset in ("all", "Burrs", "Stains")}
    # the image ROC has few points (no thinning): its area is the image AUROC exactly
    fpr, tpr = curves["image_roc/all/x"], curves["image_roc/all/y"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics["image_auroc"], abs=1e-6)
    # the pixel ROC is thinned to a few hundred points: its area stays close to the pixel AUROC
    assert np.trapezoid(curves["pixel_roc/all/y"], curves["pixel_roc/all/x"]) == pytest.approx(
        metrics["pixel_auroc"], abs=5e-3)
    assert curves["pro/all/x"].max() > 0.3 and curves["pro/all/x"][0] == 0  # up to the AUPRO limit
    save_curves(tmp_path / CURVES_NAME, curves)
    loaded = load_curves(tmp_path / CURVES_NAME)
    assert set(loaded) == set(curves) and all(np.array_equal(loaded[k], curves[k]) for k in curves)
    assert load_curves(tmp_path / "missing.npz") == {}


def test_gallery_order_without_a_threshold_is_by_score():
    rows = [{"name": str(i), "label": i % 2, "score": s} for i, s in enumerate([0.2, 0.9, 0.5])]
    assert [r["name"] for r in gallery_order(rows, None)] == ["1", "2", "0"]
    ordered = gallery_order(rows, 0.4)  # "2" is good above it (FP), "1" defective above it (TP)
    assert [(r["name"], r["outcome"]) for r in ordered] == [("2", "FP"), ("1", "TP"), ("0", "TN")]


def test_sweep_report_has_the_class_rows_the_comparison_and_the_failed_jobs(tmp_path):
    jobs = []
    for num, (pair, class_name) in enumerate([(p, c) for p in ("aliked", "xfeat") for c in ("01Ant", "02Airplane")]):
        results = {"metrics": {"pixel_auroc": 0.9 + 0.01 * num, "aupro": 0.8, "image_auroc": 0.7},
                   "localization": {"success_rate": 1.0}, "timings": {"total": {"seconds": 10.0 + num}}}
        job_dir = tmp_path / f"{num}_{class_name}"
        job_dir.mkdir()
        if num == 0:
            (job_dir / REPORT_NAME).write_text("<html></html>")
        jobs.append(JobRecord(dir=job_dir, num=num, status=OK, class_name=class_name, seed=0,
                              factors={"sfm/feature": pair, "class": class_name}, results=results))
    jobs.append(JobRecord(dir=tmp_path / "4_Nope", num=4, status=FAILED, class_name="Nope", seed=0,
                          factors={"sfm/feature": "xfeat", "class": "Nope"}, error="ValueError: unknown class 'Nope'"))
    path = write_sweep_report(tmp_path / "summary", tmp_path, jobs, build_rows(jobs))
    text = path.read_text()
    assert "<h2>Comparison of the variants (mean over classes)</h2>" in text
    assert "<h2>sfm/feature=aliked</h2>" in text and "<h2>sfm/feature=xfeat</h2>" in text
    assert text.count("<tr><td>01Ant</td><td>1</td><td>90.0</td>") == 1
    assert text.count("<td>Mean (2 classes)</td>") == 2
    assert "unknown class &#x27;Nope&#x27;" in text
    assert "href='../0_01Ant/report.html'" in text  # the job's own report, by a relative link
    sources = re.findall(r"""src=["']?([^"' >]*)""", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


# ----------------------------------------------------------------------------- headless Chromium

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; skips (before any slow fixture) on a machine without one."""
    path = next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)
    if path is None:
        pytest.skip(f"no Chromium binary on PATH ({', '.join(CHROMIUM_NAMES)}); "
                    "`apt-get install chromium` (.ci/system-packages installs it)")
    return path


def open_in_chromium(browser: str, page: Path, screenshot: Path) -> list[str]:
    """Load ``page`` in headless Chromium, save a screenshot, and return the page's console lines
    (every console message, errors and uncaught exceptions included, is logged as ``CONSOLE``)."""
    done = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--screenshot={screenshot}",
                           "--window-size=1280,2000", "--enable-logging=stderr", "--v=0",
                           "--hide-scrollbars", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_the_console_check_sees_a_page_error(chromium, tmp_path):
    """The check below would notice an error: a page that throws shows up in the console lines."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body>x<script>throw new Error('report check')</script></body></html>")
    lines = open_in_chromium(chromium, page, tmp_path / "broken.png")
    assert any("Uncaught Error: report check" in line for line in lines), lines


def test_a_real_run_writes_its_report_and_prints_where(tiny_run):
    run_dir, output = tiny_run
    report = run_dir / REPORT_NAME
    assert report.is_file(), output[-3000:]
    assert (run_dir / CURVES_NAME).is_file()
    # printed after the metrics (the console's last lines, before "Outputs: <run folder>")
    assert output.index(f"Report: {report.resolve()}\n") > output.index("Results for "), output[-3000:]
    assert "No curves" not in report.read_text()


def test_the_report_of_a_real_run_opens_in_headless_chromium_without_console_errors(chromium, tiny_run, tmp_path):
    run_dir, _ = tiny_run
    screenshot = tmp_path / "report.png"
    console = open_in_chromium(chromium, run_dir / REPORT_NAME, screenshot)
    assert console == [], console
    image = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert image.shape == (2000, 1280)
    assert image.std() > 20 and (image < 128).mean() > 0.02, "the screenshot is blank"
