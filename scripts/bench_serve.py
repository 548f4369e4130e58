"""ldm-serve's throughput and latency: 16 concurrent clients against the same requests one by one.

    python scripts/bench_serve.py [--model NAME] [--models-dir DIR] [--clients 16] [--steps 25] [--rounds 2]

Starts `ldm-serve` as its own process on a free port (the default model unless told otherwise),
sends `--clients` txt2img requests (one image each, held-out prompts of the shapes world, seeds
0..n−1) first one after another, then all at once from as many threads, and reports images/s,
latency p50/p95 and the server's peak resident memory (from /proc). The best of `--rounds`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    from ldm.data.shapes import eval_prompts, format_prompt

    port = free_port()
    command = [sys.executable, "-m", "ldm.cli.serve", "--port", str(port)]
    command += ["--models-dir", args.models_dir] if args.models_dir else []
    command += ["--model", args.model] if args.model else []
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    try:
        for _ in range(600):
            try:
                info = requests.get(f"http://127.0.0.1:{port}/ldm/v1/info", timeout=1).json()
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        size = info["default_size"]
        prompts = [format_prompt(q) for q in eval_prompts(args.clients, 0)]
        bodies = [dict(prompt=t, seed=i, steps=args.steps, width=size, height=size, sampler_name="Euler",
                       cfg_scale=7.5) for i, t in enumerate(prompts)]
        requests.post(url, json=bodies[0]).raise_for_status()  # warm-up

        def timed(body, out, i):
            start = time.perf_counter()
            answer = requests.post(url, json=body)
            answer.raise_for_status()
            out[i] = time.perf_counter() - start

        results = {}
        for name in ("one by one", f"{args.clients} concurrent clients"):
            best = None
            for _ in range(args.rounds):
                latencies = [0.0] * len(bodies)
                start = time.perf_counter()
                if name == "one by one":
                    for i, body in enumerate(bodies):
                        timed(body, latencies, i)
                else:
                    threads = [threading.Thread(target=timed, args=(b, latencies, i)) for i, b in enumerate(bodies)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                wall = time.perf_counter() - start
                if best is None or wall < best[0]:
                    best = (wall, sorted(latencies))
            wall, latencies = best
            results[name] = (len(bodies) / wall, statistics.median(latencies),
                             latencies[max(0, int(round(0.95 * len(latencies))) - 1)])
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    print(f"{info['model']}, {size}x{size}, {args.steps} steps, euler; {os.cpu_count()} CPUs; server peak RSS "
          f"{rss:.0f} MiB")
    print("| requests | images/s | latency p50 (s) | latency p95 (s) |\n|---|---:|---:|---:|")
    for name, (rate, p50, p95) in results.items():
        print(f"| {name} | {rate:.2f} | {p50:.2f} | {p95:.2f} |")
    sequential, concurrent = results.values()
    print(f"throughput, concurrent / one by one: {concurrent[0] / sequential[0]:.2f}x")


if __name__ == "__main__":
    main()
