"""Peak resident memory of a LoRA bfloat16 run on SmolLM2: base loaded in float32 then cast, against loaded in bfloat16.

Each variant runs in its own subprocess (its own peak, VmHWM), in the same invocation, and the ratio is printed:

- ``load``: only loading SmolLM2-135M-Instruct and holding it as the run holds its frozen base (bfloat16);
  float32-then-cast is what tunesmith did before ``finetune.load_section``.
- ``train``: ``examples/quickstart.yaml`` for ``--steps`` LoRA steps under bfloat16 autocast, without its
  exact-match task, through ``finetune()`` (the float32 variant replaces ``load_section`` by the recipe's own
  ``model`` section, the path it replaced).

    python benchmarks/bf16_base_memory.py            # both, 5 training steps
    python benchmarks/bf16_base_memory.py --steps 2 --only load
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("float32-load", "bfloat16-load")


def status_mb(field: str) -> float:
    """A field of /proc/self/status in MB: VmHWM (peak resident), RssAnon (heap now), RssFile (mapped files now)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory() -> dict:
    return {"peak_mb": status_mb("VmHWM"), "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile")}


def bfloat16_checkpoint() -> str:
    """SmolLM2 saved in bfloat16 (as most hub checkpoints ship; tunesmith's converted alias is float32)."""
    import torch

    from tunesmith.config import ModelSection
    from tunesmith.core.runtime import cache_dir
    from tunesmith.models import load_model_and_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="smollm2-bf16-"))
    model, tokenizer = load_model_and_tokenizer(ModelSection(name="smollm2-135m-instruct", dtype="bfloat16"), cache_dir())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    return str(folder)


def child(kind: str, variant: str, steps: int, name: str) -> dict:
    import time

    import torch
    import yaml

    from tunesmith.config.loader import validate_recipe
    from tunesmith.pipeline import finetune as finetune_module

    started = time.perf_counter()
    if kind == "load":
        from tunesmith.config import ModelSection
        from tunesmith.core.runtime import cache_dir
        from tunesmith.methods.base import store_frozen_in
        from tunesmith.models import load_model_and_tokenizer

        dtype = "float32" if variant == "float32-load" else "bfloat16"
        model, _ = load_model_and_tokenizer(ModelSection(name=name, dtype=dtype), cache_dir())
        model.requires_grad_(False)
        store_frozen_in(model, torch.bfloat16)  # what cast_for_autocast does to the frozen base
        return {**memory(), "seconds": time.perf_counter() - started,
                "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    raw = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    raw["data"] = {key: str(REPO / value) if key in ("train", "validation") else value for key, value in raw["data"].items()}
    raw["eval"] = {"every_steps": 10_000}  # no exact-match task: its generation would dominate the peak and the time
    raw["train"].update(max_steps=steps, speed={"autocast": "bfloat16"}, log_every=1)
    raw["model"] = {"name": name}
    raw["output"] = {"dir": tempfile.mkdtemp(prefix="bf16-base-")}
    if variant == "float32-load":
        finetune_module.load_section = lambda recipe, device: recipe.model
    summary = finetune_module.finetune(validate_recipe(raw), progress=False)
    return {**memory(), "seconds": time.perf_counter() - started,
            "tokens_per_s": getattr(summary, "tokens_per_s", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=("load", "train"))
    parser.add_argument("--checkpoint", choices=("float32", "bfloat16", "both"), default="both",
                        help="the dtype SmolLM2's checkpoint is stored in (bfloat16: a copy saved first)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.child[2])))
        return
    rows = []
    checkpoints = ("float32", "bfloat16") if args.checkpoint == "both" else (args.checkpoint,)
    names = {"float32": "smollm2-135m-instruct"}
    if "bfloat16" in checkpoints:
        names["bfloat16"] = bfloat16_checkpoint()
    for kind, stored in ((k, c) for k in (("load", "train") if args.only is None else (args.only,)) for c in checkpoints):
        results = {}
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", kind, variant,
                                   names[stored]],
                                  capture_output=True, text=True, cwd=REPO, check=True)
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(kind, stored, variant, results[variant], flush=True)
        ratio = results["bfloat16-load"]["peak_mb"] / results["float32-load"]["peak_mb"]
        old, new = results["float32-load"], results["bfloat16-load"]
        rows.append(f"| {kind}, {stored} checkpoint | {old['peak_mb']:.0f} MB ({old['anon_mb']:.0f} + {old['file_mb']:.0f}) "
                    f"| {new['peak_mb']:.0f} MB ({new['anon_mb']:.0f} + {new['file_mb']:.0f}) | {ratio:.2f}x |")
    print("\n| what | peak RSS, float32 load then cast (heap + mapped files at the end) | peak RSS, bfloat16 load "
          "(heap + mapped files at the end) | ratio of peaks |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
