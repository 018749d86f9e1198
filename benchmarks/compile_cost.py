"""What ``train.speed.compile`` costs and gives: cold compile seconds and the step-time ratio, by model shape.

For each shape and method, two subprocesses train the same packed rows (random token ids, varied lengths)
through tunesmith's own speed seams (``apply_speed``: packing, chunked loss, bfloat16 autocast where native,
fused levers) on random weights, one eager and one with ``compile: true``, each with an empty inductor cache
(a cold compile, as a user's first run). Compile seconds = the compiled run's first steps less the eager
run's same steps (every distinct length compiles once more until dynamo marks it dynamic); the ratio =
eager seconds per token over compiled seconds per token on the later steps. These figures set the rule
behind ``compile: auto`` (``tunesmith.training.speed.COMPILE_SECONDS`` and ``COMPILE_SPEEDUP``).

    python benchmarks/compile_cost.py                                  # smollm2-135m shape, LoRA and full
    python benchmarks/compile_cost.py --shape smollm2-1.7b --methods lora --steps 4 --tokens 128

Weights are random: compile time and step time do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)


def config_of(shape: str):
    from transformers import AutoConfig

    from tunesmith.models.shapes import shape_config

    if shape == "tiny":  # to check the script
        values = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=int(os.environ.get("TINY_LAYERS", 2)), num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if shape == "smollm2-135m":
        values = dict(SMOLLM2_135M)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return shape_config(shape)


def worker(shape: str, method_kind: str, compile_on: bool, steps: int, tokens: int) -> dict:
    import torch

    from tunesmith.config import FullMethod, LoraMethod, SpeedSection, TrainSection
    from tunesmith.data.encode import EncodedExample
    from tunesmith.methods import build_method
    from tunesmith.methods.base import trainable_in_float32
    from tunesmith.models.shapes import build_random_model
    from tunesmith.training.speed import apply_speed, autocast_dtype

    torch.manual_seed(0)
    config = config_of(shape)
    config._attn_implementation = "sdpa"
    section = SpeedSection(compile=compile_on)
    dtype = torch.bfloat16 if method_kind == "lora" and autocast_dtype(section, torch.device("cpu")) else torch.float32
    model = build_random_model(config, "cpu", dtype).train()
    method = build_method(LoraMethod(r=16, dropout=0.0) if method_kind == "lora" else FullMethod())
    model = method.apply(model)
    if dtype != torch.float32:
        trainable_in_float32(model)
    setup = apply_speed(model, method, section, TrainSection(), torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    times, counts = [], []
    for _ in range(steps):
        # Eight examples a step, lengths uniform up to ``tokens`` (as chat data of varied length): rows differ.
        pieces = torch.randint(16, tokens, (8,), generator=generator).tolist()
        length = sum(pieces)
        examples = []
        for piece in pieces:
            ids = torch.randint(3, config.vocab_size, (piece,), generator=generator).tolist()
            examples.append(EncodedExample(tuple(ids), tuple(ids)))
        batch = setup.collate_fn(examples, 0)
        started = time.perf_counter()
        loss = setup.token_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        counts.append(length)
    setup.undo()
    return {"times": times, "tokens": counts}


def run(shape: str, method: str, compile_on: bool, steps: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(REPO / "src"))
        command = [sys.executable, __file__, "--worker", "--shape", shape, "--methods", method,
                   "--steps", str(steps), "--tokens", str(tokens)] + (["--compile"] if compile_on else [])
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rate(run: dict, start: int) -> float:
    """Tokens per second over the steps from ``start``."""
    return sum(run["tokens"][start:]) / sum(run["times"][start:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help="smollm2-135m or a built-in shape (smollm2-1.7b...)")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=8, help="steps per run; the last half are timed for the ratio")
    parser.add_argument("--tokens", type=int, default=512, help="longest example (eight a step, lengths uniform below it)")
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.shape, args.methods, args.compile, args.steps, args.tokens)))
        return
    for method in args.methods.split(","):
        eager = run(args.shape, method, False, args.steps, args.tokens)
        compiled = run(args.shape, method, True, args.steps, args.tokens)
        half = args.steps // 2
        compile_seconds = sum(compiled["times"][:half]) - sum(eager["times"][:half])
        print(json.dumps({"shape": args.shape, "method": method, "compile_seconds": round(compile_seconds, 1),
                          "eager_step_s": round(sum(eager["times"][half:]) / (args.steps - half), 2),
                          "speedup": round(rate(compiled, half) / rate(eager, half), 3),
                          "eager": [round(t, 2) for t in eager["times"]],
                          "compiled": [round(t, 2) for t in compiled["times"]]}), flush=True)


if __name__ == "__main__":
    main()
