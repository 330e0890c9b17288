"""The detection service under a bounded load, against the in-process Detector on the same images.

The service (``python -m splatpose.service``, a separate process, uvicorn) runs on a free loopback port
beside an in-process ``Detector`` of the same run.

1. Paired, one client, for each ``--stacks`` (uvicorn's HTTP parser and event loop): ``--requests``
   images (the run's test images, cycled), after ``--warmup`` of each; image i goes through
   ``Detector.detect(path)`` in process, then through POST /detect from httpx and from the stdlib's
   http.client, so that all see the same machine load (a shared CPU's load swings by seconds).
   p50/p95/p99, and the service's overhead, split by the answers' ``Server-Timing`` into what happens
   outside the handler (client, connection, uvicorn) and the handler's own steps
   (:func:`paired_one_client`).
2. For each ``--max-batch`` B (a service started with ``--max-batch B``) and each ``--concurrency``
   C > 1: ``--requests`` POST /detect requests from C client threads (httpx, one connection each):
   p50/p95/p99 per request, throughput, errors (any non-200), the three slowest requests with their
   batch size and timings. Inference is serialised in the service; with B > 1 the requests that wait
   go through the Detector together (micro-batches).

Writes a markdown table to stdout (and ``--out`` when given, rewritten after every row so that a run
cut short keeps what it measured); progress on stderr; each service's own output goes to
``<out>.service<B>-<stack>.log`` (or is dropped without ``--out``).

    python experiments/bench_service.py --run-dir outputs/runs/synthetic/03Nut/<time> --device cpu \
        --requests 12 --concurrency 4 --out experiments/results/service_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
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


def server_timing(headers) -> dict[str, float]:
    """An answer's ``Server-Timing`` header as {step: milliseconds}."""
    value = next((v for k, v in headers.items() if k.lower() == "server-timing"), "")
    steps = (part.split(";dur=") for part in value.split(", ") if part)
    return {name: float(ms) for name, ms in steps}


def paired_one_client(detector, url: str, images: list[Path], n: int, warmup: int) -> tuple[dict, dict, dict]:
    """(in-process row, HTTP row, overheads in ms), with in-process calls and POST /detect from two clients
    (httpx, the stdlib's http.client) interleaved image by image, so that all see the same machine load.

    Overheads (medians per request, httpx unless said): ``paired``, HTTP latency - the in-process call
    just before it; ``paired_stdlib``, the same with http.client; ``within``, HTTP latency - the service's
    own work on the image (its Detector call, ``detect_seconds``, and the upload's decoding and check,
    ``times.load``), which load swings do not blur; ``outside``, HTTP latency - the handler's time
    (Server-Timing total: the client, the connection, uvicorn, the routing) and ``outside_stdlib``;
    ``steps``, the handler's own steps beyond the work: read, prepare - times.load, inference -
    detect_seconds, answer; ``get``, a GET /health round trip with httpx (the HTTP floor)."""
    bodies = [p.read_bytes() for p in images]
    host, port = url.removeprefix("http://").split(":")
    stdlib = http.client.HTTPConnection(host, int(port), timeout=300)

    def post_stdlib(body: bytes, retry: bool = True) -> tuple[float, dict]:
        start = time.perf_counter()
        try:
            stdlib.request("POST", "/detect", body=body, headers={"Content-Type": "image/png"})
            response = stdlib.getresponse()
            response.read()
        except (ConnectionError, http.client.HTTPException):
            # uvicorn closes a connection idle for 5 s (slow CPU rows): reconnect, once
            stdlib.close()
            if not retry:
                raise
            return post_stdlib(body, retry=False)
        return time.perf_counter() - start, dict(response.getheaders())

    with httpx.Client(timeout=300) as client:
        for i in range(warmup):
            detector.detect(images[i % len(images)])
            client.post(f"{url}/detect", content=bodies[i % len(bodies)])
            post_stdlib(bodies[i % len(bodies)])
        local, remote, remote_stdlib, inside, handler, handler_stdlib, steps, errors = [], [], [], [], [], [], [], 0
        for i in range(n):
            start = time.perf_counter()
            assert detector.detect(images[i % len(images)]).ok
            local.append(time.perf_counter() - start)
            start = time.perf_counter()
            response = client.post(f"{url}/detect", content=bodies[i % len(bodies)])
            remote.append(time.perf_counter() - start)
            errors += response.status_code != 200
            answer = response.json() if response.status_code == 200 else {}
            work = answer.get("detect_seconds", np.nan), answer.get("times", {}).get("load", np.nan)
            inside.append(sum(work))
            timing = server_timing(response.headers)
            handler.append(timing.get("total", np.nan) / 1e3)
            steps.append([timing.get("read", np.nan), timing.get("prepare", np.nan) - work[1] * 1e3,
                          timing.get("inference", np.nan) - work[0] * 1e3, timing.get("answer", np.nan)])
            seconds, headers = post_stdlib(bodies[i % len(bodies)])
            remote_stdlib.append(seconds)
            handler_stdlib.append(server_timing(headers).get("total", np.nan) / 1e3)
        get = []
        for _ in range(n):
            start = time.perf_counter()
            client.get(f"{url}/health")
            get.append(time.perf_counter() - start)
    stdlib.close()
    median_ms = lambda a, b: float(np.nanmedian(np.subtract(a, b)) * 1e3)  # noqa: E731
    overheads = {"paired": median_ms(remote, local), "paired_stdlib": median_ms(remote_stdlib, local),
                 "within": median_ms(remote, inside), "outside": median_ms(remote, handler),
                 "outside_stdlib": median_ms(remote_stdlib, handler_stdlib),
                 "steps": dict(zip(("read", "prepare", "inference", "answer"), np.nanmedian(steps, axis=0))),
                 "get": float(np.median(get) * 1e3)}
    return ({**percentiles(local), "throughput": n / sum(local), "errors": 0},
            {**percentiles(remote), "throughput": n / sum(remote), "errors": errors}, overheads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def progress(message: str) -> None:
    print(f"[bench_service {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# uvicorn stacks (--stacks): HTTP parser and event loop of the service
STACKS = {"auto": ("auto", "auto"), "h11": ("h11", "asyncio"), "httptools": ("httptools", "uvloop")}


def start_service(run_dir: Path, device: str, max_batch: int, log: Path | None,
                  stack: str = "auto") -> tuple[subprocess.Popen, str]:
    """A service process on a free loopback port, once GET /ready answers 200 (its warm-up included)."""
    port = free_port()
    sink = open(log, "w") if log else subprocess.DEVNULL
    http, loop = STACKS[stack]
    proc = subprocess.Popen([sys.executable, "-m", "splatpose.service", str(run_dir), "--port", str(port),
                             "--device", device, "--max-batch", str(max_batch), "--http", http, "--loop", loop],
                            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
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

    def one(i: int) -> tuple[float, int, str]:
        client = clients[i % concurrency]
        start = time.perf_counter()
        response = client.post(f"{url}/detect", content=bodies[i % len(bodies)])
        seconds = time.perf_counter() - start
        answer = response.json() if response.status_code == 200 else {}
        what = (f"{seconds * 1e3:.0f} ms: batch of {answer.get('batch_size')}, Detector call "
                f"{answer.get('detect_seconds', np.nan) * 1e3:.0f} ms, Server-Timing "
                f"{response.headers.get('server-timing')}")
        return seconds, response.status_code, what

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    slowest = [what for _, _, what in sorted(outcomes, key=lambda o: -o[0])[:3]]
    return {**percentiles([t for t, _, _ in outcomes]), "throughput": n / wall,
            "errors": sum(status != 200 for _, status, _ in outcomes), "slowest": slowest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1],
                        help="serve.max_batch values: a service per value for the concurrent rows")
    parser.add_argument("--stacks", nargs="+", default=["auto"], choices=sorted(STACKS),
                        help="uvicorn stacks for the paired one-client rows (auto: httptools + uvloop when "
                             "installed; h11: h11 + asyncio)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from splatpose.detect.detector import Detector

    images = test_images(args.run_dir)
    progress(f"in-process detector on {args.device} ({len(images)} distinct test images)")
    detector = Detector.from_run(args.run_dir, device=args.device)  # warmed up as the service's is
    if detector.cfg.warm_up:
        detector.warm_up()
    rows, overheads = [], {}
    try:
        for stack in args.stacks:
            with running_service(args, args.max_batch[0], stack) as url:
                local, remote, overheads[stack] = paired_one_client(detector, url, images, args.requests, args.warmup)
                rows += [("in-process Detector.detect", 1, 1, local), (f"HTTP POST /detect ({stack})", 1, 1, remote)]
                report(args, rows, overheads, len(images))
        for max_batch in args.max_batch:
            with running_service(args, max_batch, args.stacks[0]) as url:
                for c in [c for c in args.concurrency if c > 1]:
                    rows.append((f"HTTP POST /detect ({args.stacks[0]})", max_batch, c,
                                 bench_http(url, images, args.requests, args.warmup, c)))
                    report(args, rows, overheads, len(images))
    finally:
        detector.close()
    print(report(args, rows, overheads, len(images)))


@contextlib.contextmanager
def running_service(args, max_batch: int, stack: str):
    """The URL of a service started for the rows inside the ``with``; stopped after them."""
    log = args.out.with_suffix(f".service{max_batch}-{stack}.log") if args.out else None
    proc, url = start_service(args.run_dir, args.device, max_batch, log, stack)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def report(args, rows: list, overheads: dict, distinct_images: int) -> str:
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
    for stack, o in overheads.items():
        lines += ["", f"Service overhead at 1 client, uvicorn stack `{stack}` (http, loop = {STACKS[stack]}), "
                      "median per request:",
                  f"- HTTP latency minus the in-process call just before it (paired): {o['paired']:.2f} ms",
                  f"- HTTP latency minus the service's own work (detect_seconds + times.load): {o['within']:.2f} ms,"
                  f" of which outside the handler (client, connection, uvicorn, routing) {o['outside']:.2f} ms",
                  f"- with the stdlib's http.client as the client: paired {o['paired_stdlib']:.2f} ms, outside the "
                  f"handler {o['outside_stdlib']:.2f} ms",
                  "- the handler's steps beyond the work (hand-offs, JSON; ms): " + ", ".join(f"{k} {v:.2f}" for k, v in o["steps"].items()),
                  f"- a GET /health round trip: {o['get']:.2f} ms"]
    slow = [(what, b, c, r["slowest"]) for what, b, c, r in rows if r.get("slowest")]
    if slow:
        lines += ["", "Slowest requests per concurrent row:"]
        lines += [f"- max_batch {b}, {c} clients: " + "; ".join(s) for what, b, c, s in slow]
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
