"""Make the data of the forgetting example: a narrow task and general text written by the base model.

    python examples/forgetting/make_data.py [MODEL] [OUT_FOLDER]

MODEL is a built-in alias (default: smollm2-135m-instruct), a hub id or a local model folder;
OUT_FOLDER defaults to runs/forgetting-data. Writes into OUT_FOLDER:
  narrow.jsonl           stories in one rigid pattern (the task)
  general_replay.jsonl   text the base model writes itself (the replay source, the EWC reference)
  general_heldout.jsonl  more of it, never trained on (the retain text: its perplexity measures forgetting)

For a chat model (its tokenizer has a chat template) the records are conversations: the task asks
for a short story and answers with the rigid pattern; the general text is the model's own answers
(sampled at temperature 0.7, top-p 0.9) to everyday requests (explain, list tips, write a story, compare, ...),
with prompts never shared between the replay and held-out files. For a plain language model
(e.g. stories260k) the records are plain text: the pattern itself, and what the model writes from
its start token.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Optional

NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Lucy", "Tim", "Sue"]
THINGS = ["ball", "cat", "dog", "car", "box", "hat", "kite", "cake", "bird", "tree"]
COLOURS = ["red", "blue", "big", "small", "green", "happy", "yellow", "soft"]

# Everyday requests for a chat model's own answers: every template with every topic, shuffled.
REQUESTS = [
    "Explain what {} is in simple words.", "Give me three tips about {}.", "Write a short story about {}.",
    "Why do people care about {}?", "Write a short poem about {}.", "What are the pros and cons of {}?",
    "Describe {} to a ten-year-old.", "Tell me an interesting fact about {}.",
    "How would you start learning about {}?", "Write a friendly email to a friend about {}.",
]
TOPICS = [
    "the ocean", "gardening", "a rainy day", "the moon", "cooking pasta", "bicycles", "saving money",
    "a new job", "volcanoes", "friendship", "learning a language", "the internet", "a lost cat",
    "healthy sleep", "trains", "the history of bread", "recycling", "a mountain trip", "chess",
    "photosynthesis",
]


def narrow_stories(count: int, seed: int = 0) -> list[str]:
    """Stories in one rigid pattern: the narrow style the model is fine-tuned on."""
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        name, thing, colour = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLOURS)
        stories.append(f"{name} had a {colour} {thing}. {name} said, \"I love my {colour} {thing}!\" "
                       f"{name} and the {thing} were happy. The end.")
    return stories


def narrow_conversations(count: int, seed: int = 0) -> list[dict]:
    """The rigid stories as answers to a request that names the story's character and thing."""
    conversations = []
    for story in narrow_stories(count, seed):
        name, _, rest = story.partition(" had a ")
        thing = rest.split(".")[0]
        request = f"Write a very short story about {name} and a {thing}."
        conversations.append({"messages": [{"role": "user", "content": request},
                                           {"role": "assistant", "content": story}]})
    return conversations


def load(model_name: str):
    """The model (eval mode) and tokenizer of an alias, hub id or folder, resolved as tunesmith does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.loading import resolve_model_path
    from tunesmith.core.runtime import cache_dir

    path = resolve_model_path(model_name, cache_dir())
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def model_stories(model, tokenizer, count: int, seed: int, max_length: int = 160) -> list[str]:
    """Stories sampled from a plain language model (temperature 1) from its start token."""
    import torch

    torch.manual_seed(seed)
    prompt = torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long)
    with torch.no_grad():
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                top_k=0, top_p=1.0, max_length=max_length, pad_token_id=tokenizer.eos_token_id)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]
    return [t for t in texts if len(t.split()) >= 8]


def model_answers(model, tokenizer, count: int, seed: int, max_new_tokens: int = 96,
                  batch_size: int = 16) -> list[dict]:
    """A chat model's own answers to ``count`` distinct everyday requests.

    Sampled at temperature 0.7, top-p 0.9: the model's typical answers (a 135M model sampled at
    temperature 1 over its full vocabulary drifts into other languages and broken words).
    """
    import torch

    requests = [template.format(topic) for template in REQUESTS for topic in TOPICS]
    if count > len(requests):
        raise ValueError(f"at most {len(requests)} distinct requests; asked for {count}")
    random.Random(seed).shuffle(requests)
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    torch.manual_seed(seed)
    conversations = []
    for start in range(0, count, batch_size):
        batch = requests[start: start + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                                 add_generation_prompt=True) for r in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=0, top_p=0.9,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for request, row in zip(batch, output[:, inputs["input_ids"].shape[1]:]):
            answer = whole_sentences(tokenizer.decode(row, skip_special_tokens=True).strip())
            conversations.append({"messages": [{"role": "user", "content": request},
                                               {"role": "assistant", "content": answer}]})
    return conversations


def whole_sentences(text: str) -> str:
    """An answer cut by the token limit, up to its last finished sentence (when that keeps most of it)."""
    end = max(text.rfind(mark) for mark in (".", "!", "?", "\n"))
    return text[: end + 1].strip() if end >= len(text) // 2 else text


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r if isinstance(r, dict) else {"text": r}) + "\n" for r in records))


def make_data(model_name: str, out: Path, narrow: int = 256, general: Optional[int] = None,
              heldout: Optional[int] = None, seed: int = 0, max_length: int = 160, max_new_tokens: int = 96) -> dict[str, Path]:
    """Write the three files; returns their paths by name.

    Args:
        model_name: Alias, hub id or model folder.
        out: Output folder.
        narrow, general, heldout: Record counts of the task, the replay text and the retain text
            (defaults: 256, 128, 48 for chat models; 256, 256, 64 for plain language models).
        seed: Seed of the task draws and of the sampling.
        max_length: Plain language models: tokens per sampled story (start token included).
        max_new_tokens: Chat models: tokens per sampled answer.
    """
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(model_name)
    if tokenizer.chat_template:
        general, heldout = general or 128, heldout or 48
        task: list = narrow_conversations(narrow, seed)
        texts: list = model_answers(model, tokenizer, general + heldout, seed, max_new_tokens)
    else:
        general, heldout = general or 256, heldout or 64
        task, texts = narrow_stories(narrow, seed), model_stories(model, tokenizer, general + heldout, seed, max_length)
    paths = {"narrow": out / "narrow.jsonl", "replay": out / "general_replay.jsonl",
             "heldout": out / "general_heldout.jsonl"}
    write_jsonl(paths["narrow"], task)
    write_jsonl(paths["replay"], texts[heldout:])
    write_jsonl(paths["heldout"], texts[:heldout])
    return paths


if __name__ == "__main__":
    model_arg = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    out_arg = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/forgetting-data")
    for label, written in make_data(model_arg, out_arg).items():
        print(f"{label}: {written}")
