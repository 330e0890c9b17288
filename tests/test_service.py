"""The detection service as a client uses it: the real uvicorn server on a loopback port, a real HTTP
client (httpx), a finished tiny run behind it.

The run is tests/conftest.py's ``tiny_run``: made once per session by ``python run.py`` itself, its
stage cache kept in pytest's cache folder (the first session trains it, later ones reuse it). That
command's console output is checked here too (no glog lines, one line per Lightning message, no
advertising; on a reused cache no SfM runs, so the glog check only bites on a fresh one, as in
tests/test_pipeline.py's slow run).
"""

import base64
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from loopback import free_loopback_port  # tests/loopback.py
from splatpose.detect.inputs import EncodedImage
from splatpose.service import DetectionService, InferenceQueue, build_app

DETECT = {"matching": "sequential", "warm_up": False, "threshold": 0.5}  # tests/conftest.py's TINY_DETECT
GLOG_LINE = re.compile(r"^[IWEF]\d{8} ", re.MULTILINE)


@pytest.fixture(scope="session")
def detector(tiny_detector):
    return tiny_detector  # tests/conftest.py's, with the same settings (DETECT)


@pytest.fixture(scope="session")
def service_url(tiny_run):
    """The real service (uvicorn in a thread) on a free loopback port; stopped after the session."""
    run_dir, _ = tiny_run
    service = DetectionService(run_dir, DETECT, device="cpu", max_body_bytes=2_000_000)
    service.load_in_background()
    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail(f"the service did not become ready: {service.load_error}")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def post_image(url: str, path: Path, **params) -> httpx.Response:
    return httpx.post(f"{url}/detect", content=Path(path).read_bytes(), params=params, timeout=120)


def test_run_console_is_quiet_and_results_hold_the_splats_quality(tiny_run):
    run_dir, output = tiny_run
    assert not GLOG_LINE.search(output), "COLMAP/glog lines reached the console"
    assert "💡 Tip" not in output and "litlogger" not in output
    assert "LeafSpec" not in output
    # Lightning's own handler prints "INFO: msg", Hydra's "[time][logger][INFO] - msg": one of the two only
    hydra_info = [line.split("] - ", 1)[1] for line in output.splitlines() if "][INFO] - " in line]
    bare_info = [line.removeprefix("INFO: ") for line in output.splitlines() if line.startswith("INFO: ")]
    assert not set(hydra_info) & set(bare_info), "Lightning's lines came twice (its handler and Hydra's)"
    assert any("GPU available" in line for line in hydra_info), "Lightning's lines must still come once"
    splat = json.loads((run_dir / "results.json").read_text())["splat"]
    assert splat["psnr"] > 10 and 0 < splat["ssim"] <= 1
    assert splat["num_gaussians"] > 0 and splat["train_seconds"] > 0


def test_health_ready_and_metrics(service_url):
    assert httpx.get(f"{service_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{service_url}/ready").json()["ready"] is True
    text = httpx.get(f"{service_url}/metrics").text
    assert "# TYPE splatpose_detect_seconds histogram" in text
    assert re.search(r'splatpose_requests_total\{endpoint="/ready",status="200"\} [1-9]', text)


def test_good_and_defective_images_score_as_the_detector_api_does(service_url, detector, tiny_run_images):
    for kind in ("good", "defect"):
        path = tiny_run_images[kind]
        response = post_image(service_url, path, map="png")
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = detector.detect(path, answer["name"])
        assert answer["score"] == pytest.approx(expected.score, abs=1e-6)
        assert answer["anomalous"] == (expected.score >= 0.5) and answer["threshold"] == 0.5
        assert answer["pose_path"] == expected.pose_path and answer["localized"] == expected.localized
        assert {"extract", "match", "render", "score", "total"} <= set(answer["times"])
        # the upload's decoding and check (before the inference queue) is its load stage, counted in total
        assert answer["times"]["load"] > 0
        stages = ("load", "upload", "extract", "retrieve", "match", "pnp", "refine", "render", "score")
        assert answer["times"]["total"] == pytest.approx(sum(answer["times"].get(s, 0.0) for s in stages), abs=1e-5)
        anomaly_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["map_png"]))))
        assert anomaly_map.shape == expected.anomaly_map.shape
        assert np.abs(anomaly_map / 255.0 - np.clip(expected.anomaly_map, 0, 1)).max() <= 1 / 255 + 1e-6


def test_micro_batches_form_under_load_and_score_as_single_images(detector, tiny_run_images):
    """Images that wait while the detector is busy share one detect_batch call (at most max_batch); their
    results are the single-image ones up to the float rounding of another batch size (see
    tests/test_detector.py's batch test)."""
    paths = tiny_run_images["all"][:5]
    expected = [detector.detect(p) for p in paths]
    inference = InferenceQueue(detector, max_batch=3)
    try:
        futures = [inference.submit(detector.prepare(EncodedImage(p.read_bytes(), p.name)), p.name) for p in paths]
        results = [future.result(timeout=600) for future in futures]
    finally:
        inference.close()
    batch_sizes = [batch for _, _, batch in results]
    assert max(batch_sizes) > 1 and max(batch_sizes) <= 3, batch_sizes
    for (detection, seconds, _), single in zip(results, expected):
        assert detection.ok and seconds > 0
        assert detection.localized == single.localized
        assert np.abs(detection.anomaly_map - single.anomaly_map).max() < 5e-3


def test_an_upload_decodes_as_the_file_does(detector, tiny_run_images):
    path = Path(tiny_run_images["defect"])
    from_bytes = detector.prepare(EncodedImage(path.read_bytes(), "upload.png"))
    np.testing.assert_array_equal(from_bytes.pixels, detector.prepare(path).pixels)


def test_bad_requests_get_4xx_with_a_message_and_the_service_stays_up(service_url, tiny_run_images, tmp_path):
    good = Path(tiny_run_images["good"]).read_bytes()
    cases = {"corrupt": (good[:200], 422), "not an image": (b"hello, not an image", 422),
             "empty": (b"", 400), "too large": (b"\0" * 2_000_001, 413)}
    image = Image.open(tiny_run_images["good"])
    other_aspect = io.BytesIO()
    image.resize((image.width * 2, image.height)).save(other_aspect, format="PNG")
    cases["wrong size"] = (other_aspect.getvalue(), 422)
    for what, (body, status) in cases.items():
        response = httpx.post(f"{service_url}/detect", content=body, timeout=60)
        assert response.status_code == status, (what, response.text)
        assert response.json()["detail"], what
    assert httpx.post(f"{service_url}/detect", content=good, params={"map": "gif"}).status_code == 400
    assert post_image(service_url, tiny_run_images["good"]).status_code == 200  # still serving
    metrics = httpx.get(f"{service_url}/metrics").text
    assert re.search(r'splatpose_requests_total\{endpoint="/detect",status="422"\} [3-9]', metrics)


def test_concurrent_requests_and_multipart_give_the_detector_api_results(service_url, detector, tiny_run_images):
    paths = tiny_run_images["all"]  # names repeat across defect folders (000.png): compare by position
    expected = [detector.detect(p).score for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda p: post_image(service_url, p), paths))
    assert [r.status_code for r in responses] == [200] * len(paths)
    assert [r.json()["score"] for r in responses] == pytest.approx(expected, abs=1e-6)

    files = [("files", (f"{i}_{p.name}", p.read_bytes(), "image/png")) for i, p in enumerate(paths[:3])]
    answer = httpx.post(f"{service_url}/detect", files=files, timeout=120).json()
    assert [d["name"] for d in answer["detections"]] == [name for _, (name, _, _) in files]
    assert [d["score"] for d in answer["detections"]] == pytest.approx(expected[:3], abs=1e-6)
