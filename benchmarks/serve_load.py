"""Load test of ``tunesmith serve`` on loopback: N concurrent chat requests against the same N sent
one at a time. Prints latency p50/p95, aggregate completion tokens/s and the ratios of the two.

    python benchmarks/serve_load.py                          # stories260k from ../shared/assets, 32 requests
    python benchmarks/serve_load.py --model smollm2-135m-instruct --requests 32 --max-tokens 48

A benchmark, not a test: figures depend on the machine; the ratios were measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TUNESMITH_TEST_ASSETS", REPO.parent / "shared" / "assets"))
PROMPTS = ["Tell me a story about a cat.", "What did Lily find in the park?", "Write about a big red ball.",
           "Who is Tom's best friend?", "Describe a rainy day.", "What does the little bird sing?",
           "Tell me about a brave dog.", "Why was Sam sad?"]


def start_server(workspace: Path, model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--workspace", str(workspace),
                                "--port", str(port), "--model", f"bench={model}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


async def one(client: httpx.AsyncClient, index: int, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json={
        "model": "bench", "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]


async def measure(url: str, requests: int, max_tokens: int, concurrent: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one(client, 0, 4)  # load the model before timing
        started = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, i, max_tokens) for i in range(requests)))
        else:
            results = [await one(client, i, max_tokens) for i in range(requests)]
        wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    tokens = sum(count for _, count in results)
    return {"answered": len(results), "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "wall": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "models" / "stories260k"), help="Alias or model folder.")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--port", type=int, default=8917)
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="tunesmith-serve-bench-"))
    server = start_server(workspace, args.model, args.port)
    try:
        url = f"http://127.0.0.1:{args.port}"
        alone = asyncio.run(measure(url, args.requests, args.max_tokens, concurrent=False))
        together = asyncio.run(measure(url, args.requests, args.max_tokens, concurrent=True))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workspace, ignore_errors=True)
    print(f"model {args.model}, {args.requests} chat requests, max_tokens {args.max_tokens}, greedy; "
          f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print("| requests | answered | latency p50 (s) | latency p95 (s) | wall (s) | completion tokens | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, row in (("one at a time", alone), (f"{args.requests} concurrent", together)):
        print(f"| {name} | {row['answered']} | {row['p50']:.3f} | {row['p95']:.3f} | {row['wall']:.2f} | "
              f"{row['tokens']} | {row['tokens_per_s']:.1f} |")
    print(f"aggregate tokens/s ratio (concurrent / one at a time): {together['tokens_per_s'] / alone['tokens_per_s']:.2f}x; "
          f"wall time ratio: {alone['wall'] / together['wall']:.2f}x")


if __name__ == "__main__":
    main()
