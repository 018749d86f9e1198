"""Make the data of the forgetting example: a narrow task and general text written by the base model.

    python examples/forgetting/make_data.py MODEL_FOLDER OUT_FOLDER

writes into OUT_FOLDER:
  narrow.jsonl           stories in one repeated style (the task)
  general_replay.jsonl   stories the base model writes itself (the replay source)
  general_heldout.jsonl  more of them, never trained on (the retain text: its perplexity measures forgetting)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Lucy", "Tim", "Sue"]
THINGS = ["ball", "cat", "dog", "car", "box", "hat", "kite", "cake", "bird", "tree"]
COLOURS = ["red", "blue", "big", "small", "green", "happy", "yellow", "soft"]


def narrow_stories(count: int, seed: int = 0) -> list[str]:
    """Stories in one rigid pattern: the narrow style the model is fine-tuned on."""
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        name, thing, colour = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLOURS)
        stories.append(f"{name} had a {colour} {thing}. {name} said, \"I love my {colour} {thing}!\" "
                       f"{name} and the {thing} were happy. The end.")
    return stories


def model_stories(model_folder: str, count: int, seed: int, max_length: int = 160) -> list[str]:
    """Stories sampled from the base model (temperature 1): text in the model's own general domain."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    torch.manual_seed(seed)
    prompt = torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long)
    with torch.no_grad():
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                top_k=0, top_p=1.0, max_length=max_length, pad_token_id=tokenizer.eos_token_id)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]
    return [t for t in texts if len(t.split()) >= 8]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def make_data(model_folder: str, out: Path, narrow: int = 256, general: int = 256, heldout: int = 64,
              seed: int = 0, max_length: int = 160) -> dict[str, Path]:
    """Write the three files; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    stories = model_stories(model_folder, general + heldout, seed, max_length)
    paths = {"narrow": out / "narrow.jsonl", "replay": out / "general_replay.jsonl",
             "heldout": out / "general_heldout.jsonl"}
    write_jsonl(paths["narrow"], narrow_stories(narrow, seed))
    write_jsonl(paths["replay"], stories[heldout:])
    write_jsonl(paths["heldout"], stories[:heldout])
    return paths


if __name__ == "__main__":
    for name, path in make_data(sys.argv[1], Path(sys.argv[2])).items():
        print(f"{name}: {path}")
