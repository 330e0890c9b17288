"""The detection service: a finished run's :class:`~splatpose.detect.detector.Detector` behind HTTP.

    python run.py task=serve run_dir=outputs/runs/synthetic/01Ant/<time> serve.port=8000
    curl --data-binary @part.png 'http://127.0.0.1:8000/detect?map=png'

Endpoints
    POST /detect    body: one PNG/JPEG (raw bytes), or multipart/form-data with one or more files.
                    Query ``map=png`` adds the anomaly map as a base64 PNG (``map_png``, 8-bit, 0..1 of
                    the run's normalisation clipped), ``map=array`` as nested lists (``map``, float).
                    Raw body: one detection object; multipart: ``{"detections": [...]}`` in upload order.
                    A detection: name, score, anomalous (score >= threshold; null without
                    ``detect.threshold``), threshold, localized, pose_path, w2c, flags, num_inliers,
                    times (seconds per stage), detect_seconds (Detector.detect's wall time: the rest
                    of a request's latency is the service's), and the map when asked.
                    400: empty body or no files; 413: body over ``serve.max_body_bytes``; 422: not a
                    decodable image or a size the run's camera cannot take (the Detector's input checks,
                    ``detect.on_size_mismatch``); 503: the run is still loading; 500: the detection
                    itself failed (the service stays up). Errors: ``{"detail": message}``.
                    Header ``Server-Timing`` (ms): read (the body), prepare (decoding and checking),
                    inference (queued until detected), answer (JSON, maps), total (the handler).
    GET /health     200 while the process serves (liveness).
    GET /ready      200 once the run is loaded, 503 before (with the error if loading failed).
    GET /metrics    Prometheus text format: requests by endpoint and status, detection errors,
                    detection latency histogram, images detected.

One inference at a time: the Detector's buffers and CUDA graphs are not thread-safe, so one worker
thread runs it (:class:`InferenceQueue`) while the HTTP handling stays concurrent: the event loop reads
bodies and awaits the worker's results, a thread pool decodes and checks images and encodes maps.
Micro-batching (``serve.max_batch`` > 1): the requests that wait while the worker is busy go through
the Detector together, up to ``max_batch`` at a time; a lone request never waits for company.
"""

import asyncio
import base64
import io
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from splatpose.detect.inputs import EncodedImage, InputError, LoadedImage
from splatpose.errors import require_extra

log = logging.getLogger(__name__)

MAP_FORMATS = ("png", "array")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestError(Exception):
    """A request the service refuses; ``status`` is the HTTP status, the message says what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServiceMetrics:
    """Counters and a latency histogram, rendered in the Prometheus text exposition format."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    detection_errors: int = 0
    images: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    latency_sum: float = 0.0
    latency_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def observe_detection(self, seconds: float, ok: bool) -> None:
        with self.lock:
            self.images += 1
            self.detection_errors += not ok
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    self.latency_counts[i] += 1

    def prometheus_text(self) -> str:
        with self.lock:
            lines = ["# HELP splatpose_requests_total HTTP requests by endpoint and status.",
                     "# TYPE splatpose_requests_total counter"]
            lines += [f'splatpose_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP splatpose_detection_errors_total Images whose detection failed inside the service.",
                      "# TYPE splatpose_detection_errors_total counter",
                      f"splatpose_detection_errors_total {self.detection_errors}",
                      "# HELP splatpose_images_total Images detected (ok or failed).",
                      "# TYPE splatpose_images_total counter",
                      f"splatpose_images_total {self.images}",
                      "# HELP splatpose_detect_seconds Wall time of the Detector call that held an image (queue "
                      "wait excluded; a micro-batch's images share its call).",
                      "# TYPE splatpose_detect_seconds histogram"]
            lines += [f'splatpose_detect_seconds_bucket{{le="{b}"}} {n}'
                      for b, n in zip(LATENCY_BUCKETS_S, self.latency_counts)]
            lines += [f'splatpose_detect_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                      f"splatpose_detect_seconds_sum {self.latency_sum:.6f}",
                      f"splatpose_detect_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


class InferenceQueue:
    """Runs ``detector.detect_batch`` on one worker thread. ``submit`` queues one prepared image and
    returns a Future of ``(Detection, seconds of the call that held it, batch size)``; the worker takes
    the oldest waiting image and up to ``max_batch - 1`` more that are already waiting, so batches form
    only under load. An exception of the whole call fails each of its Futures."""

    def __init__(self, detector, max_batch: int = 1):
        if int(max_batch) < 1:
            raise ValueError(f"serve.max_batch={max_batch} must be at least 1")
        self.detector, self.max_batch = detector, int(max_batch)
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="detector-worker", daemon=True)
        self._worker.start()

    def submit(self, image: LoadedImage, name: str) -> Future:
        future: Future = Future()
        self._waiting.put((image, name, future))
        return future

    def close(self) -> None:
        self._waiting.put(None)

    def _work(self) -> None:
        while (item := self._waiting.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    extra = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if extra is None:
                    self._waiting.put(None)  # finish this batch, then stop
                    break
                batch.append(extra)
            start = time.perf_counter()
            try:
                detections = self.detector.detect_batch([image for image, _, _ in batch], [n for _, n, _ in batch])
            except Exception as error:  # the service answers 500 for each and stays up
                for _, _, future in batch:
                    future.set_exception(error)
                continue
            seconds = time.perf_counter() - start
            for (_, _, future), detection in zip(batch, detections):
                future.set_result((detection, seconds, len(batch)))


class DetectionService:
    """Loads a finished run once (in the background, so that /health answers at once) and detects
    uploaded images through its :class:`InferenceQueue`.

    Args:
        run_dir: folder of a finished evaluation run (holds results.json).
        detect_cfg: the ``detect`` node (threshold, size policy, ...), as for task=detect.
        device: "auto" | "cpu" | "cuda[:i]".
        max_body_bytes: larger uploads are refused with 413.
        max_files: files per multipart request.
        max_batch: micro-batch size of the :class:`InferenceQueue` (1: one image at a time).
    """

    def __init__(self, run_dir: Path | str, detect_cfg: DictConfig | dict | None = None, device: str = "auto",
                 max_body_bytes: int = 20_000_000, max_files: int = 32, max_batch: int = 1):
        self.run_dir = Path(run_dir)
        self.detect_cfg = detect_cfg
        self.device = device
        self.max_body_bytes = int(max_body_bytes)
        self.max_files = int(max_files)
        self.max_batch = int(max_batch)
        self.detector = None
        self.inference: InferenceQueue | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.metrics = ServiceMetrics()

    def load(self) -> None:
        """Build the Detector (and warm it up when ``detect.warm_up``, on a GPU for every micro-batch size);
        failures are kept for /ready."""
        from splatpose.detect.detector import Detector

        try:
            detector = Detector.from_run(self.run_dir, self.detect_cfg, device=self.device)
            if detector.cfg.warm_up:
                # a micro-batch holds 1 to max_batch images and on a GPU each size has its own CUDA graphs:
                # the two ends are captured now, the sizes between on first sight (one slow request each).
                # Capturing every size ahead took 68 GiB of an H100 at max_batch 8 (LightGlue's shapes).
                for size in sorted({1, self.max_batch}) if detector.device.startswith("cuda") else [1]:
                    detector.warm_up(size)
            self.inference = InferenceQueue(detector, self.max_batch)
            self.detector = detector
            log.info("Serving %s", self.run_dir)
        except Exception as error:  # /ready reports it; the process stays up to say so
            self.load_error = f"{type(error).__name__}: {error}"
            log.error("Could not load the run %s: %s", self.run_dir, self.load_error)
        finally:
            self.loaded.set()

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="detector-load", daemon=True)
        thread.start()
        return thread

    def ready(self) -> bool:
        return self.detector is not None

    def submit_upload(self, body: bytes, name: str, map_format: str | None = None) -> Future:
        """Check and decode one upload (the Detector's own decoding and input checks, in the calling
        thread, so the same pixels as the Python API on the same file) and queue it for inference.

        Raises:
            RequestError: 400/413/422/503 for requests to change."""
        if map_format is not None and map_format not in MAP_FORMATS:
            raise RequestError(400, f"map={map_format!r} is unknown; use map=png or map=array, or leave it out")
        if not self.ready():
            raise RequestError(503, "the run is still loading" if self.load_error is None
                               else f"the run {self.run_dir} could not be loaded: {self.load_error}")
        if not body:
            raise RequestError(400, f"{name}: the body is empty; send the image's bytes (PNG or JPEG)")
        if len(body) > self.max_body_bytes:
            raise RequestError(413, f"{name}: {len(body)} bytes is over serve.max_body_bytes="
                                    f"{self.max_body_bytes}; send a smaller image or raise the setting")
        try:
            image = self.detector.prepare(EncodedImage(body, name))
        except InputError as error:
            raise RequestError(422, str(error)) from error
        return self.inference.submit(image, name)

    def finish_upload(self, future: Future, name: str, map_format: str | None) -> dict:
        """The answer of a submitted upload (blocks until its detection is done).

        Raises:
            RequestError: 500 when the detection failed."""
        try:
            detection, seconds, batch = future.result()
        except Exception as error:  # unexpected: answer 500 and keep serving
            self.metrics.observe_detection(0.0, ok=False)
            log.error("detection of %s failed: %s: %s", name, type(error).__name__, error)
            raise RequestError(500, f"{name}: detection failed: {type(error).__name__}: {error}") from error
        self.metrics.observe_detection(seconds, ok=detection.ok)
        if not detection.ok:
            raise RequestError(500, f"{name}: detection failed: {detection.error}")
        answer = detection_answer(detection, self.detector.cfg.threshold, map_format)
        answer["detect_seconds"] = round(seconds, 6)  # the Detector call that held this image
        answer["batch_size"] = batch
        return answer


def detection_answer(detection, threshold, map_format: str | None) -> dict:
    """The JSON answer for one detection (see the module docstring)."""
    record = detection.record()
    answer = {key: record[key] for key in ("name", "score", "anomalous", "localized", "pose_path", "flags",
                                           "num_inliers", "confidence", "w2c", "times")}
    answer["threshold"] = None if threshold is None else float(threshold)
    if map_format == "png":
        answer["map_png"] = base64.b64encode(map_png_bytes(detection.anomaly_map)).decode("ascii")
    elif map_format == "array":
        answer["map"] = np.asarray(detection.anomaly_map, dtype=np.float32).tolist()
    return answer


def map_png_bytes(anomaly_map: np.ndarray) -> bytes:
    """[S, S] float map -> 8-bit grayscale PNG (0..1 of the run's normalisation; above 1 clipped)."""
    from PIL import Image

    pixels = (np.clip(anomaly_map, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def build_app(service: DetectionService):
    """The FastAPI app for ``service`` (endpoints in the module docstring)."""
    require_extra(("fastapi", "uvicorn", "multipart"), "the detection service")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="SplatPose+ detection service", version="1")

    def answer(endpoint: str, status: int, content) -> JSONResponse:
        service.metrics.count_request(endpoint, status)
        return JSONResponse(content, status_code=status)

    @app.get("/health")
    def health():
        return answer("/health", 200, {"status": "ok"})

    @app.get("/ready")
    def ready():
        if service.ready():
            return answer("/ready", 200, {"ready": True, "run_dir": str(service.run_dir)})
        detail = "loading" if service.load_error is None else service.load_error
        return answer("/ready", 503, {"ready": False, "detail": detail})

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(service.metrics.prometheus_text(), media_type="text/plain; version=0.0.4")

    @app.post("/detect")
    async def detect(request: Request, map: str | None = None):
        clock = [("start", time.perf_counter())]
        try:
            uploads = await read_uploads(request, service)
            clock.append(("read", time.perf_counter()))
            # every file queued before any is awaited, so that a multipart request's files share micro-batches
            futures = [await run_in_threadpool(service.submit_upload, body, name, map) for body, name in uploads]
            clock.append(("prepare", time.perf_counter()))
            # the event loop waits, no thread is held; a failed detection is answered by finish_upload
            await asyncio.wait([asyncio.wrap_future(future) for future in futures])
            clock.append(("inference", time.perf_counter()))
            finish = [(future, name, map) for future, (_, name) in zip(futures, uploads)]
            answers = ([service.finish_upload(*args) for args in finish] if map is None  # done: no blocking
                       else await run_in_threadpool(lambda: [service.finish_upload(*args) for args in finish]))
            content = answers[0] if len(answers) == 1 and not is_multipart(request) else {"detections": answers}
            clock.append(("answer", time.perf_counter()))
        except RequestError as error:
            return answer("/detect", error.status, {"detail": str(error)})
        except Exception as error:  # anything else is ours: 500, and the service goes on
            log.exception("POST /detect failed")
            return answer("/detect", 500, {"detail": f"internal error: {type(error).__name__}: {error}"})
        response = answer("/detect", 200, content)
        response.headers["Server-Timing"] = server_timing(clock)
        return response

    return app


def server_timing(clock: list[tuple[str, float]]) -> str:
    """``Server-Timing`` header value from ``[(step, perf_counter at its end)]`` (the first is the
    start): each step's duration and the total, in milliseconds."""
    steps = [f"{name};dur={(end - before) * 1e3:.3f}" for (_, before), (name, end) in zip(clock, clock[1:])]
    return ", ".join(steps + [f"total;dur={(clock[-1][1] - clock[0][1]) * 1e3:.3f}"])


def is_multipart(request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def read_uploads(request, service: DetectionService) -> list[tuple[bytes, str]]:
    """[(bytes, name)] of a request: its body, or each file of a multipart form."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > service.max_body_bytes * max(service.max_files, 1):
        raise RequestError(413, f"the request declares {declared} bytes, over serve.max_body_bytes="
                                f"{service.max_body_bytes} per file")
    if not is_multipart(request):
        return [(await request.body(), request.query_params.get("name") or "upload")]
    form = await request.form(max_files=service.max_files)
    files = [value for _, value in form.multi_items() if hasattr(value, "read")]
    if not files:
        raise RequestError(400, "the multipart form holds no file; send the images as file fields")
    return [(await f.read(), f.filename or f"upload_{i}") for i, f in enumerate(files)]


def serve_task(cfg: DictConfig) -> None:
    """``python run.py task=serve run_dir=... serve.port=8000``: serve until interrupted."""
    require_extra(("fastapi", "uvicorn", "multipart"), "task=serve (the detection service)")
    import uvicorn

    if not cfg.get("run_dir"):
        raise ValueError("run_dir is not set; pass run_dir=<folder of a finished evaluation run> (the folder "
                         "`python run.py` printed as 'Outputs: ...')")
    serve = cfg.serve
    service = DetectionService(cfg.run_dir, cfg.get("detect"), device=cfg.get("device", "auto"),
                               max_body_bytes=serve.max_body_bytes, max_files=serve.max_files,
                               max_batch=serve.max_batch)
    service.load_in_background()
    print(f"Serving {cfg.run_dir} on http://{serve.host}:{serve.port} (POST /detect, GET /health /ready /metrics)",
          flush=True)
    uvicorn.run(build_app(service), host=str(serve.host), port=int(serve.port), log_level="warning",
                http=str(serve.http), loop=str(serve.loop))


def main() -> None:
    """``splatpose-serve RUN_DIR [--port 8000] [--host 127.0.0.1] [--device auto] [--threshold T]``."""
    import argparse

    require_extra(("fastapi", "uvicorn", "multipart"), "splatpose-serve (the detection service)")
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve a finished SplatPose+ run's detector over HTTP.")
    parser.add_argument("run_dir", help="folder of a finished evaluation run (holds results.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threshold", type=float, default=None, help="detect.threshold (image score)")
    parser.add_argument("--max-batch", type=int, default=1, help="serve.max_batch (micro-batching)")
    parser.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                        help="serve.http: uvicorn's HTTP parser (auto: httptools when installed)")
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                        help="serve.loop: uvicorn's event loop (auto: uvloop when installed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from splatpose.console import quiet_console

    quiet_console()
    service = DetectionService(args.run_dir, {"threshold": args.threshold}, device=args.device,
                               max_batch=args.max_batch)
    service.load_in_background()
    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="warning", http=args.http,
                loop=args.loop)


if __name__ == "__main__":
    main()
