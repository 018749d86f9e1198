"""Inductor options for the compiled decode step, each timed against the lean float32 step in its own phase.

    VARIANTS=fp32,fp32-cppwrap,int8,int8-freeze N=100 THREADS=1 python benchmarks/compiled_step_variants.py

A variant is ``<weights>[-<option>]``: weights ``fp32`` (as loaded) or ``int8`` (the int8 twin,
``tunesmith.inference.quantized``); option ``cppwrap`` (inductor's ``cpp_wrapper=True``) or ``freeze``
(``freezing=True``). Each variant compiles after ``torch._dynamo.reset()`` (dynamo keeps its graphs per
code object: without it a new step of the same model reuses the last graph, whatever the options), then
three rounds alternate it with the lean float32 step; the best of each is compared. Busy-machine ratios.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

from tunesmith.inference.compiled import CompiledStep  # noqa: E402
from tunesmith.inference.decoding import LeanDecoder, Row, RowBatch  # noqa: E402
from tunesmith.inference.generate import load_for_inference  # noqa: E402
from tunesmith.inference.quantized import quantized_twin  # noqa: E402

OPTIONS = {"": {}, "cppwrap": {"cpp_wrapper": True}, "freeze": {"freezing": True}}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    n = int(os.environ.get("N", "100"))
    model, tokenizer = load_for_inference(os.environ.get("MODEL", "smollm2-135m-instruct"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story about a cat who learns to swim."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    weights = {"fp32": model, "int8": quantized_twin(model, "int8")}

    def run(m, step, count: int = n) -> list[int]:
        batch, row = RowBatch(m, compiled=step), Row(list(prompt))
        batch.join([row], room=n + 1)  # the capacity of an n-token reply always: one compile per variant
        while len(row.tokens) < count:
            batch.step()
        return row.tokens

    lean = {kind: run(m, None, 48) for kind, m in weights.items()}
    for name in os.environ.get("VARIANTS", "fp32,fp32-cppwrap,int8,int8-freeze").split(","):
        kind, _, option = name.partition("-")
        torch._dynamo.reset()
        step = CompiledStep(LeanDecoder.fit(weights[kind]))
        started = time.perf_counter()
        with inductor_config.patch(OPTIONS[option]):
            tokens = run(weights[kind], step, 48)
        print(f"{name}: compile and 48 tokens {time.perf_counter() - started:.0f} s; failed {step.failed}; "
              f"greedy tokens as the lean step's: {tokens == lean[kind]}", flush=True)
        best = {"lean fp32": float("inf"), name: float("inf")}
        for _ in range(3):
            for label, (m, s) in {"lean fp32": (model, None), name: (weights[kind], step)}.items():
                started = time.perf_counter()
                run(m, s)
                best[label] = min(best[label], (time.perf_counter() - started) / n * 1e3)
        print(f"  {name}: {best[name]:.1f} ms/token, lean fp32 {best['lean fp32']:.1f}: "
              f"{best['lean fp32'] / best[name]:.2f}x the lean float32 step", flush=True)


if __name__ == "__main__":
    main()
