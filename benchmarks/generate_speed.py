"""Single-stream generation speed: tunesmith's decoding path against ``model.generate`` and llama.cpp.

    python benchmarks/generate_speed.py                                  # SmolLM2, 200 new tokens, 2 threads
    python benchmarks/generate_speed.py --new-tokens 64 --repeats 1

One greedy chat reply of exactly ``--new-tokens`` tokens (no stop token ends it) from the same prompt:
plain ``model.generate`` and ``tunesmith.inference.decoding.decode`` (its lean decode step, and its compiled
step: ``decode(..., compile=True)``, ``tunesmith generate --compile``), each in float32 (as loaded) and with
the weights in bfloat16 (``--dtype bfloat16``), in int8 (``decode(..., quantize="int8")``, ``tunesmith generate
--quantize int8``) and in int4 (``--quantize int4``), and llama.cpp through node-llama-cpp on the same model written
by tunesmith's exporter as an f16 GGUF, as a Q8_0 GGUF (int8 blocks of 32 weights: the fair match for the int8 rows)
and as a Q4_0 GGUF (4-bit blocks of 32, the embedding and output matrices Q8_0: the match for the int4 rows). Prefill included, model load excluded; the best of ``--repeats`` rounds, each round running
every PyTorch engine once in turn (llama.cpp runs its repeats in its own process). The compile of the
compiled step happens in its warm-up (not timed in the rounds); its seconds are printed, with the number
of new tokens after which it has paid for itself against the lean step.
A benchmark, not a test: the ratios were measured in one run, on whatever else the machine was doing.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a story about a cat who learns to swim."}]


def round_rates(engines: dict, new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Tokens/s of each engine in each of ``repeats`` rounds; every round runs each engine once, in turn,
    so that a load that moves during the run falls on every engine alike."""
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, run in engines.items():
            started = time.perf_counter()
            produced = run()
            rates[name].append(produced / (time.perf_counter() - started))
            assert produced == new_tokens, produced
            print(f"  {name}: {rates[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)  # progress
    return rates


def llama_cpp_rate(model, tokenizer, prompt: list[int], new_tokens: int, repeats: int, threads: int,
                   quantize: str = "f16") -> dict:
    from tunesmith.core.runtime import node_llama_cpp_dir
    from tunesmith.export.gguf import write_gguf
    from tunesmith.export.llama_cpp import llama_cpp_unavailable
    from tunesmith.inference.generate import stop_token_ids

    reason = llama_cpp_unavailable()
    if reason:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="tunesmith-generate-speed-") as folder:
        gguf = Path(folder) / f"model-{quantize}.gguf"
        write_gguf(model, tokenizer, gguf, quantize, "bench", stop_token_ids(tokenizer)[-1])
        request = {"model": str(gguf), "prompt": prompt, "new_tokens": new_tokens, "threads": threads,
                   "repeats": repeats + 1}  # the first run warms up
        done = subprocess.run(["node", str(REPO / "benchmarks" / "llama_cpp_speed.mjs")], input=json.dumps(request),
                              capture_output=True, text=True, cwd=folder, timeout=1800,
                              env={**os.environ, "NODE_PATH": str(node_llama_cpp_dir())})
    if done.returncode != 0:
        return {"skipped": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no message"}
    runs = json.loads(done.stdout)["runs"][1:]
    return {"rate": max(run["tokens"] / run["seconds"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--skip", default="", help="leave out the PyTorch engines whose name contains one of these "
                                                   "comma-separated words (each compile costs minutes on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tunesmith.core.runtime import cpu_description
    from tunesmith.inference.decoding import decode
    from tunesmith.inference.generate import load_for_inference, stop_token_ids

    model, tokenizer = load_for_inference(args.model)
    rendered = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = list(rendered["input_ids"])
    ids = torch.tensor([prompt])
    n = args.new_tokens

    halved = copy.deepcopy(model).to(torch.bfloat16)  # --dtype bfloat16: the weights as the f16 GGUF holds them

    def plain(weights, n: int = n) -> int:
        with torch.no_grad():
            output = weights.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return output.shape[1] - len(prompt)

    def ours(weights, n: int = n, compile: bool = False, quantize=None) -> int:
        return len(decode(weights, [prompt], n, compile=compile, quantize=quantize)[0])

    engines = {"model.generate (float32)": functools.partial(plain, model),
               "tunesmith decode (float32)": functools.partial(ours, model),
               "model.generate (bfloat16 weights)": functools.partial(plain, halved),
               "tunesmith decode (bfloat16 weights)": functools.partial(ours, halved),
               "tunesmith decode, compiled (float32)": functools.partial(ours, model, compile=True),
               "tunesmith decode, compiled (bfloat16 weights)": functools.partial(ours, halved, compile=True),
               "tunesmith decode (int8 weights)": functools.partial(ours, model, quantize="int8"),
               "tunesmith decode, compiled (int8 weights)": functools.partial(ours, model, compile=True, quantize="int8"),
               "tunesmith decode (int4 weights)": functools.partial(ours, model, quantize="int4"),
               "tunesmith decode, compiled (int4 weights)": functools.partial(ours, model, compile=True, quantize="int4")}
    skipped = [word for word in args.skip.split(",") if word]
    engines = {name: run for name, run in engines.items()
               if name == "model.generate (float32)" or not any(word in name for word in skipped)}
    compile_seconds = {}
    for name, run in engines.items():
        started = time.perf_counter()
        run(n=n if "compiled" in name else 8)  # warm up; the compiled step compiles for the cache's capacity here
        if "compiled" in name:
            compile_seconds[name] = time.perf_counter() - started
            print(f"  {name}: warm-up with its compile {compile_seconds[name]:.0f} s", file=sys.stderr, flush=True)
    rounds = round_rates(engines, n, args.repeats)
    rows = {name: max(values) for name, values in rounds.items()}
    stops = stop_token_ids(tokenizer)
    expected = plain_tokens(model, ids, 48, len(prompt), tokenizer, stops)
    same = decode(model, [prompt], 48, stops)[0] == expected
    same_compiled = decode(model, [prompt], 200, stops, compile=True)[0][:48] == expected
    same_int8 = decode(model, [prompt], 48, stops, quantize="int8")[0] == expected
    same_int4 = decode(model, [prompt], 48, stops, quantize="int4")[0] == expected
    llama = {"skipped": "--no-llama-cpp"} if args.no_llama_cpp else llama_cpp_rate(model, tokenizer, prompt, n,
                                                                                     args.repeats, args.threads)
    if "rate" in llama:
        rows["llama.cpp f16 GGUF (node-llama-cpp)"] = llama["rate"]
        for quantize in ("q8_0", "q4_0"):
            quantised = llama_cpp_rate(model, tokenizer, prompt, n, args.repeats, args.threads, quantize)
            if "rate" in quantised:
                rows[f"llama.cpp {quantize.upper()} GGUF (node-llama-cpp)"] = quantised["rate"]
    print(f"model {args.model}, {n} new tokens greedy, {args.threads} threads, prompt {len(prompt)} tokens; "
          f"float32 greedy tokens equal to model.generate's: {same} (lean), {same_compiled} (compiled), "
          f"int8's (48 tokens): {same_int8}, int4's: {same_int4}; load average (1 min) at the end: "
          f"{os.getloadavg()[0]:.1f}; CPU: {cpu_description()}"
          + ("" if "rate" in llama else f"; llama.cpp skipped: {llama['skipped']}"))
    reference = rows["model.generate (float32)"]
    q8_rate = rows.get("llama.cpp Q8_0 GGUF (node-llama-cpp)")
    q4_rate = rows.get("llama.cpp Q4_0 GGUF (node-llama-cpp)")
    print("| engine | tokens/s (best) | vs model.generate | vs model.generate, median of rounds | vs llama.cpp f16 | "
          "vs llama.cpp Q8_0 | vs llama.cpp Q4_0 |")
    print("|---|---|---|---|---|---|---|")
    for name, rate in rows.items():
        versus = f"{rate / llama['rate']:.2f}x" if "rate" in llama else "-"
        versus += f" | {rate / q8_rate:.2f}x" if q8_rate else " | -"
        versus += f" | {rate / q4_rate:.2f}x" if q4_rate else " | -"
        paired = [mine / theirs for mine, theirs in zip(rounds.get(name, []), rounds["model.generate (float32)"])]
        median = f"{statistics.median(paired):.2f}x" if paired else "-"
        print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x | {median} | {versus} |")
    for name, seconds in compile_seconds.items():
        lean = rows[name.replace(", compiled", "")]  # the same weights' lean step
        saved = 1 / lean - 1 / rows[name]  # seconds per token
        warm = seconds - n / rows[name]  # the warm-up less its decoding
        payback = f"{warm / saved:.0f} new tokens" if saved > 0 else "never (not faster)"
        print(f"{name}: compile about {warm:.0f} s (warm-up {seconds:.0f} s less its {n} tokens); "
              f"pays back against the lean step after {payback}")


def plain_tokens(model, ids, n: int, prompt_length: int, tokenizer, stops: list[int]) -> list[int]:
    """``model.generate``'s greedy reply, ending at a stop token (kept) as tunesmith's decode does."""
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return output[0, prompt_length:].tolist()


if __name__ == "__main__":
    main()
