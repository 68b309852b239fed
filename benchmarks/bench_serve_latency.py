"""One-image latency of the served endpoint (pipelines/serve.py, Ray Serve) on 127.0.0.1, on the CPU.

    .venv/bin/python benchmarks/bench_serve_latency.py
    .venv/bin/python benchmarks/bench_serve_latency.py --presets tiny --requests 200 --in-flight 1 4

For each preset (random initialisation, ``model.backbone_weights=none``, 21 classes as VOC) a
checkpoint is written to a temporary folder and served by ``pipelines/serve.py --model <folder>
--address local`` (a private loopback cluster, ``--replicas`` replicas of ``--cpus`` CPUs each).
One image (``--image`` WxH, a JPEG of smooth blobs on noise, ~100 kB at 500x375) is POSTed
``--requests`` times by a bounded load loop: at most K requests in flight (K in ``--in-flight``;
each of K client threads keeps one HTTP connection and sends its next request when its answer
came back), after ``--warmup`` untimed requests. Reported per (preset, K): latency median, p90,
p99 and max (ms, from sending the request to the parsed JSON answer) and the throughput
(answers/s over the loop). For reference, the same image through ``ssd.serving.Detector`` in
this process (decode + preprocess + forward + post-processing, ``--cpus`` torch threads):
the work a request costs without HTTP, Serve's proxy and the replica's queue.

The machine's load (``uptime``) is recorded at the start and the end: the figures are only
comparable between runs on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, library_version, machine_info
from torchvision.io import encode_jpeg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "serve_latency"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "ssd300_vgg16"])
    p.add_argument("--requests", type=int, nargs="+", default=[200, 60],
                   help="timed requests per K, one value per preset (or one for all)")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 4], help="the bounds K of the load loop")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests first")
    p.add_argument("--image", default="500x375", help="WxH of the posted image (default VOC's typical 500x375)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (its torch threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    return p


def make_image(width: int, height: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 6, 8), generator=g, dtype=torch.uint8)
    base = torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="bilinear")[0]
    image = (base + torch.randint(-20, 21, (3, height, width), generator=g)).clamp(0, 255).to(torch.uint8)
    return encode_jpeg(image, quality=90).numpy().tobytes()


def make_checkpoint(preset: str, folder: Path, seed: int) -> Path:
    from ssd.checkpoint import save_checkpoint
    from ssd.config import load_config
    from ssd.models import build_model

    cfg = load_config(preset, ["model.num_classes=21", "model.backbone_weights=none"])
    torch.manual_seed(seed)
    classes = [f"class{i}" for i in range(1, 21)]
    return save_checkpoint(folder / preset, model=build_model(cfg), epoch=0, step=0, config=cfg, classes=classes)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "pipelines" / "serve.py"), "--model", str(checkpoint), "--address", "local",
             "--port", str(port), "--replicas", str(args.replicas), "--cpus", str(args.cpus),
             "--max-ongoing-requests", str(max(8, max(args.in_flight)))],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"serve.py did not answer in 300 s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def load_loop(port: int, body: bytes, requests: int, in_flight: int) -> tuple[list[float], float]:
    """``requests`` POSTs with at most ``in_flight`` outstanding. Returns the latencies (s) and the
    loop's wall time (s). Every answer must be a 200 with detections."""
    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [requests]
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while True:
                with lock:
                    if remaining[0] == 0 or errors:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                conn.request("POST", "/", body=body, headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                answer = json.loads(response.read())
                took = time.perf_counter() - start
                if response.status != 200 or "detections" not in answer:
                    errors.append(f"HTTP {response.status}: {answer}")
                    return
                with lock:
                    latencies.append(took)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(in_flight)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return latencies, wall


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank: the smallest value with at least q % of the
    values at or below it (the p99 of 60 values is the largest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def in_process_ms(checkpoint: Path, body: bytes, threads: int, repeats: int) -> float:
    from ssd.serving import Detector

    torch.set_num_threads(max(1, threads))
    detector = Detector.from_checkpoint(checkpoint)
    detector.predict([body])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.predict([body])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.image.lower().split("x"))
    body = make_image(width, height, args.seed)
    requests = args.requests if len(args.requests) == len(args.presets) else [args.requests[0]] * len(args.presets)
    started = uptime()
    print(f"uptime at the start: {started}", flush=True)
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for preset, count in zip(args.presets, requests):
            checkpoint = make_checkpoint(preset, Path(tmp), args.seed)
            reference = in_process_ms(checkpoint, body, int(args.cpus), repeats=max(5, min(30, count // 4)))
            port = _free_port()
            proc = start_server(checkpoint, port, args, Path(tmp) / f"{preset}.log")
            try:
                load_loop(port, body, args.warmup, 1)
                for k in args.in_flight:
                    latencies, wall = load_loop(port, body, count, k)
                    ms = [t * 1000 for t in latencies]
                    row = {"preset": preset, "in_flight": k, "requests": count,
                           "median_ms": statistics.median(ms), "p90_ms": percentile(ms, 90),
                           "p99_ms": percentile(ms, 99), "max_ms": max(ms), "answers_per_s": count / wall,
                           "in_process_ms": reference}
                    cases.append(row)
                    print(f"{preset} K={k}: median {row['median_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                          f"{row['answers_per_s']:.2f}/s (in process {reference:.1f} ms)", flush=True)
            finally:
                stop_server(proc)
    ended = uptime()
    result = {"benchmark": NAME, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": machine_info(int(args.cpus)), "image": f"{width}x{height} JPEG, {len(body)} bytes",
              "settings": {"replicas": args.replicas, "cpus_per_replica": args.cpus, "warmup": args.warmup,
                           "seed": args.seed},
              "uptime_start": started, "uptime_end": ended, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "library_commit": library_version(), "cases": cases}
    print(f"\n## {NAME}\n\nuptime: start `{started}`, end `{ended}`\n")
    print(markdown_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| preset | in flight | requests | median ms | p90 ms | p99 ms | max ms | answers/s | in-process ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["cases"]:
        lines.append(f"| {row['preset']} | {row['in_flight']} | {row['requests']} | {row['median_ms']:.1f} | "
                     f"{row['p90_ms']:.1f} | {row['p99_ms']:.1f} | {row['max_ms']:.1f} | "
                     f"{row['answers_per_s']:.2f} | {row['in_process_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
