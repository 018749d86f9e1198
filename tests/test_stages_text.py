"""Stages pt, cls, kto, orpo and simpo end to end on the tests' tiny Llama; bad preference, KTO and label data."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tiny_files import kto_file, text_file
from tunesmith.config import ModelSection, apply_override, validate_recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.data.preference import encode_pairs
from tunesmith.data.readers import RawRecord
from tunesmith.data.templates import resolve_template
from tunesmith.models.loading import load_tokenizer
from tunesmith.pipeline.finetune import finetune

from conftest import TINY_DATA, TINY_PAIRS

LORA = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def recipe(tiny_llama, tmp_path, stage, data, *overrides, output="run", method=LORA):
    raw = {"stage": stage, "model": {"name": tiny_llama}, "data": data, "method": dict(method),
           "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-3, "log_every": 1, "seed": 0},
           "output": {"dir": str(tmp_path / output)}}
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw)


def validation_records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_pt_cuts_text_into_blocks_and_perplexity_falls(tiny_llama, tmp_path):
    from tunesmith.data.formats import Example
    from tunesmith.data.pretraining import text_blocks

    tokenizer = load_tokenizer(tiny_llama, ModelSection(name=tiny_llama))
    blocks, stats = text_blocks([Example(text="Once upon a time there was a cat. " * 20)], tokenizer, 64)
    assert all(len(b.input_ids) <= 64 and b.labels == b.input_ids for b in blocks)  # loss on every token
    assert sum(len(b.input_ids) for b in blocks) == len(tokenizer("Once upon a time there was a cat. " * 20,
                                                                  add_special_tokens=False)["input_ids"]) + 2
    data = {"train": str(text_file(tmp_path / "wiki.txt", 40)), "max_length": 128, "validation_fraction": 0.1}
    summary = finetune(recipe(tiny_llama, tmp_path, "pt", data, "train.max_steps=12", "eval.every_steps=4",
                              "train.lr=3e-3", method={"kind": "full"}), progress=False)
    perplexities = [r["val_perplexity"] for r in validation_records(tmp_path / "run")]
    assert perplexities[-1] < perplexities[0] * 0.9, perplexities
    assert summary["val_perplexity"] == perplexities[-1]


def sentiment_rows(count: int, seed: int) -> list[str]:
    """A generated two-class task a tiny model can learn: the label says which word the story has."""
    rng = random.Random(seed)
    rows = ["sentence\tlabel"]
    for _ in range(count):
        label = rng.choice(["happy", "sad"])
        words = rng.choices(["the", "cat", "dog", "ran", "park", "ball", "big", "little"], k=6)
        words.insert(rng.randrange(7), label)
        rows.append(f"{' '.join(words)}\t{'1' if label == 'happy' else '0'}")
    return rows


def test_cls_beats_the_majority_class_and_reloads(tiny_llama, tmp_path):
    from tunesmith.stages.cls import classify, load_classifier

    (tmp_path / "train.tsv").write_text("\n".join(sentiment_rows(400, 0)) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(sentiment_rows(100, 1)) + "\n")
    data = {"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "dev.tsv"), "max_length": 32}
    summary = finetune(recipe(tiny_llama, tmp_path, "cls", data, "train.max_steps=40", "train.batch_size=16",
                              "train.lr=3e-3", method={"kind": "full"}), progress=False)
    validation = summary["validation"]
    assert validation["accuracy"] > validation["majority_accuracy"] + 0.2, validation
    model, tokenizer, labels = load_classifier(tmp_path / "run" / "model")
    assert labels == ["0", "1"]
    assert classify(model, tokenizer, ["the happy cat ran", "the sad dog ran"], labels) == ["1", "0"]


def test_cls_label_outside_the_label_set_names_the_row(tiny_llama, tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na good film\t1\na bad film\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nodd\tmaybe\n")
    data = {"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "dev.tsv"), "max_length": 32}
    with pytest.raises(TunesmithError, match=r"dev.tsv, line 3: label 'maybe' is not in the label set \['0', '1'\]"):
        finetune(recipe(tiny_llama, tmp_path, "cls", data), progress=False)


@pytest.mark.parametrize("stage", ["orpo", "simpo", "kto"])
def test_reference_free_and_kto_stages_train_and_resume_exactly(tiny_llama, tmp_path, stage):
    from test_training import StopAt, trained_weights

    train = kto_file(tmp_path / "kto.json", 300) if stage == "kto" else TINY_PAIRS
    data = {"train": str(train), "max_length": 192, "template": "simple"}
    common = ("train.max_steps=4", "train.checkpoint_every=2")
    summary = finetune(recipe(tiny_llama, tmp_path, stage, data, *common, output="straight"), progress=False)
    assert summary["steps"] == 4
    stopped = recipe(tiny_llama, tmp_path, stage, data, *common, output="stopped")
    with pytest.raises(TunesmithError, match="step-00000002"):
        finetune(stopped, extra_hooks=[StopAt(3)], progress=False)
    finetune(stopped, resume=True, progress=False)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "stopped")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for key, value in trained_weights(tmp_path / "straight").items():
        torch.testing.assert_close(trained_weights(tmp_path / "stopped")[key], value)


def record(**fields) -> RawRecord:
    return RawRecord("pairs.jsonl", f"line {fields.pop('line', 1)}", fields)


@pytest.fixture
def tokenizer(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama, ModelSection(name=tiny_llama))
    resolve_template(tokenizer, "simple")
    return tokenizer


def test_bad_preference_rows_are_counted_or_named(tokenizer):
    rows = [record(prompt="Tell a story.", chosen="Once upon a time.", rejected="No.", line=1),
            record(prompt="Tell a story.", chosen="Same.", rejected="Same.", line=2),
            record(prompt="  ", chosen="Yes.", rejected="No.", line=3),
            record(prompt="Tell a story. " * 60, chosen="Yes.", rejected="No.", line=4),
            record(prompt="Tell a story.", chosen="", rejected="No.", line=5)]
    pairs, stats = encode_pairs(rows, tokenizer, 64)
    assert len(pairs) == 1 and (stats.identical, stats.empty, stats.dropped) == (1, 2, 1)
    assert "1 with identical replies" in stats.describe("training")
    with pytest.raises(TunesmithError, match=r"pairs.jsonl, line 7: missing field 'rejected'.*preference format"):
        encode_pairs([record(prompt="Hi", chosen="Hello", line=7)], tokenizer, 64)


def test_replies_are_encoded_and_masked_as_sft_encodes_the_conversation(tokenizer):
    """Chosen = the SFT encoding of prompt + chosen reply; only the final reply is scored, not earlier turns."""
    from tunesmith.data.encode import encode_example
    from tunesmith.data.formats import Example

    history = [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."},
               {"from": "human", "value": "Tell a story."}]
    pairs, _ = encode_pairs([record(conversations=history, chosen={"from": "gpt", "value": "Once upon a time."},
                                    rejected={"from": "gpt", "value": "No."})], tokenizer, 128)
    pair = pairs[0]
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a time."}]
    sft = encode_example(Example(messages=tuple(turns)), tokenizer, 128)
    assert sft.input_ids[: len(pair.chosen.input_ids)] == pair.chosen.input_ids
    trained = [i for i, label in enumerate(sft.labels) if label != -100]
    scored = [i for i, label in enumerate(pair.chosen.labels) if label != -100]
    assert scored == [i for i in trained if i >= len(pair.prompt_ids)] and len(scored) < len(trained)
    assert tokenizer.decode([pair.chosen.input_ids[i] for i in scored]).strip() == "Once upon a time.</s>"


def test_stage_data_without_the_layout_says_which_it_expects(tiny_llama, tmp_path):
    data = {"train": str(TINY_DATA), "max_length": 64, "template": "simple"}
    with pytest.raises(TunesmithError, match="missing field 'prompt' expected by the preference format"):
        finetune(recipe(tiny_llama, tmp_path, "dpo", data), progress=False)
    with pytest.raises(TunesmithError, match="missing field 'messages' expected by the kto format"):
        finetune(recipe(tiny_llama, tmp_path, "kto", data, output="kto"), progress=False)


def test_stage_sections_validate_by_kind():
    data = {"train": "pairs.json"}
    assert validate_recipe({"stage": "dpo", "data": data}).stage.loss == "sigmoid"
    with pytest.raises(TunesmithError, match=r"stage.loss.*'sigmoid', 'ipo', 'hinge' or 'robust'"):
        validate_recipe({"stage": {"kind": "dpo", "loss": "sigmoidd"}, "data": data})
    with pytest.raises(TunesmithError, match="stage.label_smoothing"):
        validate_recipe({"stage": {"kind": "dpo", "label_smoothing": 0.5}, "data": data})
    with pytest.raises(TunesmithError, match="retain .* applies to stage sft and pt, not rm"):
        validate_recipe({"stage": "rm", "data": data, "retain": {}})
