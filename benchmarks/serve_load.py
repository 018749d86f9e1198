"""Load test of ``tunesmith serve`` (continuous batching) on loopback: N concurrent streamed chat
requests of mixed lengths against the same requests sent one at a time, and N concurrent requests
spread over the base and two LoRA adapters of it (one batch, per-row LoRA), each against the same mix sent one
at a time (before session 10 the adapters' run was set against the base's one at a time: unfair, the random
adapters' replies may differ in length; both figures are printed). Prints latency and
time to first token (p50/p95), aggregate completion tokens/s and the ratios, for each ``--dtype`` in one run
(float32 and bfloat16 by default; bfloat16 serving is batch-invariant, so each concurrent greedy reply is
checked against the same request's reply alone: "same text"). Then what the matmuls of one decode step cost at
32 rows against one row, measured here, in float32 and bfloat16 (a step's products only: not its other work nor
the crowd's prefill, so not a bound on the p50 ratio; session 9 measured 2.91x against a p50 of 2.75x).

    python benchmarks/serve_load.py                          # stories260k from ../shared/assets, 32 requests
    python benchmarks/serve_load.py --model smollm2-135m-instruct --requests 32 --alone 8

A benchmark, not a test: figures depend on the machine; the ratios were measured in one run.
The one-at-a-time figures come from the first ``--alone`` requests of the same mix (all by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
LENGTHS = [16, 64, 32, 48, 24, 56, 40, 20]  # max_tokens of request i: LENGTHS[i % 8] (mixed lengths)


def start_server(workspace: Path, model: str, port: int, dtype: str = "float32", threads: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--workspace", str(workspace),
                                "--port", str(port), "--model", f"bench={model}", "--dtype", dtype], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def make_adapters(workspace: Path, model: str, count: int = 2, dtype: str = "float32") -> list[str]:
    """Random LoRA adapters of the base (small, so that replies stay text), saved as plain peft runs."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.inference.generate import load_for_inference

    base, _ = load_for_inference(model, dtype=dtype)
    ids = []
    for index in range(count):
        torch.manual_seed(index)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        lora = get_peft_model(base, config)
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(0.01)
        folder = workspace / "runs" / f"lora-{index}" / "adapter"
        lora.save_pretrained(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": model}))
        base = lora.unload()
        ids.append(f"runs/lora-{index}")
    return ids


async def one(client: httpx.AsyncClient, index: int, model: str, max_tokens: int | None = None) -> dict:
    text = ""
    started, first = time.perf_counter(), None
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens or LENGTHS[index % len(LENGTHS)], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started if first is None else first
                text += chunk["choices"][0]["delta"]["content"]
    return {"latency": time.perf_counter() - started, "ttft": first if first is not None else float("nan"),
            "tokens": tokens, "text": text}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def measure(url: str, indices: list[int], models: list[str], concurrent: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        for model in set(models):
            await one(client, 0, model, 4)  # load the model (and adapters) before timing
        started = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, i, models[i % len(models)]) for i in indices))
        else:
            results = [await one(client, i, models[i % len(models)]) for i in indices]
        wall = time.perf_counter() - started
    latencies, ttfts = [r["latency"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"answered": len(results), "texts": [r["text"] for r in results], "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95),
            "ttft50": statistics.median(ttfts), "ttft95": percentile(ttfts, 0.95), "wall": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "per_token50": statistics.median(r["latency"] / max(r["tokens"], 1) for r in results)}


def matmul_bound(model: str, dtype: str, rows: int = 32, repeats: int = 5) -> tuple[float, float, int]:
    """Seconds of one decode step's matmuls (every linear layer of the model once) at 1 and at ``rows`` rows,
    best of ``repeats``, in ``dtype``, on this process's threads; and how many products a step runs."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.inference.generate import load_for_inference

    loaded, _ = load_for_inference(model, dtype=dtype)
    weights = [module.weight.detach() for module in loaded.modules() if isinstance(module, torch.nn.Linear)]
    inputs = {count: {w.shape[1]: torch.randn(count, w.shape[1], dtype=w.dtype) for w in weights} for count in (1, rows)}

    def step(count: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.no_grad():
                for weight in weights:
                    F.linear(inputs[count][weight.shape[1]], weight)
            best = min(best, time.perf_counter() - started)
        return best

    step(1), step(rows)  # warm
    return step(1), step(rows), len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "models" / "stories260k"), help="Alias or model folder.")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--alone", type=int, default=0, help="Requests of the mix sent one at a time (0: all).")
    parser.add_argument("--no-adapters", action="store_true", help="Skip the mixed-adapter run.")
    parser.add_argument("--port", type=int, default=8917)
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="serve --dtype, or several separated by commas, each served and measured in turn.")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of the server (0: its default; the server sets GOMP_SPINCOUNT, so 2 threads hold up beside a busy process).")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.core.runtime import configure_threads

    configure_threads()  # OpenMP's short spin, as in the server (before torch loads here: the products timed below)
    for dtype in args.dtype.split(","):
        serve_and_measure(args, dtype)
    if "float32" in args.dtype.split(","):
        import torch

        torch.set_num_threads(args.threads or torch.get_num_threads())
        lone, crowd, count = matmul_bound(args.model, "float32")
        print(f"float32 products: the {count} matmuls of one decode step take {crowd * 1e3:.1f} ms at 32 rows against "
              f"{lone * 1e3:.1f} ms at one row ({torch.get_num_threads()} threads): {crowd / lone:.2f}x (the products of "
              f"a step, not its other work nor the crowd's prefill: compare the p50 ratio above)")
        lone16, crowd16, _ = matmul_bound(args.model, "bfloat16")
        print(f"bfloat16, same products: {crowd16 * 1e3:.1f} ms at 32 rows against {lone16 * 1e3:.1f} ms at one row: "
              f"{crowd16 / lone16:.2f}x")


def serve_and_measure(args, dtype: str) -> None:
    """One server in ``dtype``: one at a time, all concurrent, all concurrent over the base and two adapters."""
    workspace = Path(tempfile.mkdtemp(prefix="tunesmith-serve-bench-"))
    adapters = [] if args.no_adapters else make_adapters(workspace, args.model, dtype=dtype)
    server = start_server(workspace, args.model, args.port, dtype, args.threads)
    rows = []
    try:
        url = f"http://127.0.0.1:{args.port}"
        everyone = list(range(args.requests))
        alone = asyncio.run(measure(url, everyone[: args.alone or args.requests], ["bench"], concurrent=False))
        rows.append(("one at a time", alone))
        together = asyncio.run(measure(url, everyone, ["bench"], concurrent=True))
        rows.append((f"{args.requests} concurrent", together))
        if adapters:  # against the same mix sent one at a time: an adapter's replies may run longer than the base's
            models = ["bench", *adapters]
            mixed_alone = asyncio.run(measure(url, everyone[: args.alone or args.requests], models, concurrent=False))
            rows.append((f"one at a time, base + {len(adapters)} adapters", mixed_alone))
            mixed = asyncio.run(measure(url, everyone, models, concurrent=True))
            rows.append((f"{args.requests} concurrent, base + {len(adapters)} adapters", mixed))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workspace, ignore_errors=True)
    from tunesmith.core.runtime import cpu_description

    print(f"model {args.model} ({dtype}, threads {args.threads or 'default'}), streamed chat requests, max_tokens {LENGTHS} in turn, greedy; "
          f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}; CPU: {cpu_description()}")
    print("Each row is compared with the one-at-a-time row of its own mix (the base's, or base + adapters'): the same "
          "requests to the same models, so replies of other lengths do not count as latency. "
          "Per token: a request's latency over its completion tokens, p50.")
    print("| requests | answered | latency p50 (s) | latency p95 (s) | TTFT p50 (s) | TTFT p95 (s) | wall (s) | "
          "completion tokens (per request) | tokens/s | tokens/s vs one at a time | p50 vs one at a time | "
          "p50 per token vs one at a time | same text as alone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = alone
    for name, row in rows:
        reference = row if name.startswith("one at a time") else reference
        same = f"{sum(a == b for a, b in zip(reference['texts'], row['texts']))}/{len(reference['texts'])}"
        print(f"| {name} | {row['answered']} | {row['p50']:.2f} | {row['p95']:.2f} | {row['ttft50']:.2f} | "
              f"{row['ttft95']:.2f} | {row['wall']:.1f} | {row['tokens']} ({row['tokens'] / row['answered']:.1f}) | "
              f"{row['tokens_per_s']:.1f} | {row['tokens_per_s'] / reference['tokens_per_s']:.2f}x | "
              f"{row['p50'] / reference['p50']:.2f}x | {row['per_token50'] / reference['per_token50']:.2f}x | {same} |")
    if len(rows) > 3:  # the comparison this benchmark made before session 10: the mix against the base alone
        print(f"(base + adapters concurrent against the base's one at a time, the earlier comparison: p50 "
              f"{rows[3][1]['p50'] / alone['p50']:.2f}x, tokens/s {rows[3][1]['tokens_per_s'] / alone['tokens_per_s']:.2f}x)")

if __name__ == "__main__":
    main()
