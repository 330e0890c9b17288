"""The detection service under a bounded load, against the in-process Detector on the same images.

The service (``python -m splatpose.service``, a separate process, uvicorn) runs on a free loopback port
beside an in-process ``Detector`` of the same run.

1. Paired, one client: ``--requests`` images (the run's test images, cycled), after ``--warmup`` of
   each; image i goes through ``Detector.detect(path)`` in process, then through POST /detect, so that
   both see the same machine load (a shared CPU's load swings by seconds). p50/p95/p99 of each, and the
   service's overhead (HTTP, decoding the upload in memory, the input check, JSON): the median of HTTP
   latency minus the service's own detect time reported in the same answer (``detect_seconds``), and
   the median of the paired differences.
2. For each ``--max-batch`` B (a service started with ``--max-batch B``) and each ``--concurrency``
   C > 1: ``--requests`` POST /detect requests from C client threads (httpx, one connection each):
   p50/p95/p99 per request, throughput, errors (any non-200). Inference is serialised in the service;
   with B > 1 the requests that wait go through the Detector together (micro-batches).

Writes a markdown table to stdout (and ``--out`` when given, rewritten after every row so that a run
cut short keeps what it measured); progress on stderr; each service's own output goes to
``<out>.service<B>.log`` (or is dropped without ``--out``).

    python experiments/bench_service.py --run-dir outputs/runs/synthetic/03Nut/<time> --device cpu \
        --requests 12 --concurrency 4 --out experiments/results/service_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_images(run_dir: Path) -> list[Path]:
    """The run's own generated test images (the dataset root recorded in results.json)."""
    results = json.loads((run_dir / "results.json").read_text())
    root, name = Path(results["config"]["dataset"]["root"]), results["class"]
    images = sorted(root.glob(f"*/{name}/test/*/*.png")) or sorted(root.glob(f"{name}/test/*/*.png"))
    if not images:
        raise SystemExit(f"no test images of {name} under {root}; is {run_dir} a finished run?")
    return images


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def paired_one_client(detector, url: str, images: list[Path], n: int, warmup: int) -> tuple[dict, dict, tuple]:
    """(in-process row, HTTP row, (paired overhead ms, within-request overhead ms)) with in-process and HTTP
    calls interleaved. Paired: median of (HTTP latency - the in-process call just before); within-request:
    median of (HTTP latency - the service's own work on the image: its Detector call, ``detect_seconds``,
    and the upload's decoding and check, ``times.load``), which a shared machine's load swings do not blur."""
    bodies = [p.read_bytes() for p in images]
    with httpx.Client(timeout=300) as client:
        for i in range(warmup):
            detector.detect(images[i % len(images)])
            client.post(f"{url}/detect", content=bodies[i % len(bodies)])
        local, remote, inside, errors = [], [], [], 0
        for i in range(n):
            start = time.perf_counter()
            assert detector.detect(images[i % len(images)]).ok
            local.append(time.perf_counter() - start)
            start = time.perf_counter()
            response = client.post(f"{url}/detect", content=bodies[i % len(bodies)])
            remote.append(time.perf_counter() - start)
            errors += response.status_code != 200
            answer = response.json() if response.status_code == 200 else {}
            inside.append(answer.get("detect_seconds", np.nan) + answer.get("times", {}).get("load", 0.0))
    paired_ms = float(np.median(np.subtract(remote, local)) * 1e3)
    within_ms = float(np.nanmedian(np.subtract(remote, inside)) * 1e3)
    return ({**percentiles(local), "throughput": n / sum(local), "errors": 0},
            {**percentiles(remote), "throughput": n / sum(remote), "errors": errors}, (paired_ms, within_ms))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def progress(message: str) -> None:
    print(f"[bench_service {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start_service(run_dir: Path, device: str, max_batch: int, log: Path | None) -> tuple[subprocess.Popen, str]:
    """A service process on a free loopback port, once GET /ready answers 200 (its warm-up included)."""
    port = free_port()
    sink = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "splatpose.service", str(run_dir), "--port", str(port),
                             "--device", device, "--max-batch", str(max_batch)], cwd=ROOT,
                            stdout=sink, stderr=subprocess.STDOUT)
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    while time.monotonic() < start + 300:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                progress(f"service (max_batch {max_batch}) ready in {time.monotonic() - start:.1f} s")
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}" + (f"; its output: {log}" if log else ""))
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the service did not become ready in 300 s" + (f"; its output: {log}" if log else ""))


def bench_http(url: str, images: list[Path], n: int, warmup: int, concurrency: int) -> dict:
    bodies = [p.read_bytes() for p in images]
    clients = [httpx.Client(timeout=300) for _ in range(concurrency)]
    for i in range(warmup):
        clients[0].post(f"{url}/detect", content=bodies[i % len(bodies)])

    def one(i: int) -> tuple[float, int]:
        client = clients[i % concurrency]
        start = time.perf_counter()
        status = client.post(f"{url}/detect", content=bodies[i % len(bodies)]).status_code
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return {**percentiles([t for t, _ in outcomes]), "throughput": n / wall,
            "errors": sum(status != 200 for _, status in outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1],
                        help="serve.max_batch values: a service per value for the concurrent rows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from splatpose.detect.detector import Detector

    images = test_images(args.run_dir)
    progress(f"in-process detector on {args.device} ({len(images)} distinct test images)")
    detector = Detector.from_run(args.run_dir, device=args.device)  # warmed up as the service's is
    if detector.cfg.warm_up:
        detector.warm_up()
    rows, overhead_ms = [], None
    try:
        for k, max_batch in enumerate(args.max_batch):
            log = args.out.with_suffix(f".service{max_batch}.log") if args.out else None
            proc, url = start_service(args.run_dir, args.device, max_batch, log)
            try:
                if k == 0:
                    local, remote, overhead_ms = paired_one_client(detector, url, images, args.requests, args.warmup)
                    rows += [("in-process Detector.detect", 1, 1, local), ("HTTP POST /detect", max_batch, 1, remote)]
                    report(args, rows, overhead_ms, len(images))
                for c in [c for c in args.concurrency if c > 1]:
                    rows.append(("HTTP POST /detect", max_batch, c,
                                 bench_http(url, images, args.requests, args.warmup, c)))
                    report(args, rows, overhead_ms, len(images))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    finally:
        detector.close()
    print(report(args, rows, overhead_ms, len(images)))


def report(args, rows: list, overhead_ms: tuple | None, distinct_images: int) -> str:
    """The markdown table of the rows so far (also written to ``--out``); progress names the last row."""
    load = os.getloadavg()
    if args.device.startswith("cuda"):
        import torch

        machine = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    else:
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    lines = [f"Device: {machine} (load average {load[0]:.1f} at the end), device={args.device}; "
             f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"{args.requests} requests per row, {distinct_images} distinct test images of {args.run_dir}",
             "", "| path | serve.max_batch | clients | p50 ms | p95 ms | p99 ms | images/s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {what} | {b} | {c} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['throughput']:.2f} | "
              f"{r['errors']} |" for what, b, c, r in rows]
    if overhead_ms:
        lines += ["", "Service overhead at 1 client, median per request:",
                  f"- HTTP latency minus the service's own work (detect_seconds + times.load): {overhead_ms[1]:.2f} ms",
                  f"- HTTP latency minus the in-process call just before it (paired; load swings blur it): "
                  f"{overhead_ms[0]:.2f} ms"]
    text = "\n".join(lines) + "\n"
    if rows:
        what, b, c, r = rows[-1]
        progress(f"{what} max_batch {b}, {c} clients: p50 {r['p50']:.1f} ms, {r['throughput']:.1f} images/s, "
                 f"{r['errors']} errors")
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
