"""The zero-shot label-word baseline of ``stage: cls``: what the base causal LM gets right with no training.

Each validation text is put into a prompt (``stage.zero_shot_prompt``, default ``"{text}\\nQuestion:
is this {labels}?\\nAnswer:"``) and each label's word (``stage.label_words``, e.g. ``negative``,
``positive``) is scored as its continuation after one space: the sum of its tokens' log-probabilities
(not length-normalised). The prediction is the label whose word is likeliest. Tokenisation is
lm-evaluation-harness's "joint" one: prompt + word encoded whole (after BOS, as stage cls encodes
texts), the word is what follows the prompt's own encoding. This is the primitive of
:mod:`tunesmith.evaluation.loglikelihood`; it is redone here on top of :func:`reply_logps` because
the stages sit beside the evaluation package, not above it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.stages.scoring import reply_logps
from tunesmith.training.batching import collate

ROWS_PER_BATCH = 16


def default_label_words(labels: Sequence[str]) -> Optional[tuple[str, ...]]:
    """The label names themselves when every one contains a letter (``negative``), else None (``0``, ``1``)."""
    return tuple(labels) if all(any(c.isalpha() for c in label) for label in labels) else None


def word_rows(tokenizer, prompt: str, words: Sequence[str], max_length: int) -> list[EncodedExample]:
    """One row per word: the prompt followed by the word, only the word's tokens scored.

    Rows longer than ``max_length`` keep their last ``max_length`` tokens (the word always stays).
    """
    bos = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None)
    if prompt.endswith(" "):  # the space belongs to the word, as lm-eval moves it
        prompt = prompt[:-1]
    separator = "" if prompt[-1:].isspace() else " "
    context = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = []
    for word in words:
        whole = bos + tokenizer(prompt + separator + word, add_special_tokens=False)["input_ids"]
        if whole[: len(context)] != context:  # the word merged into the prompt's last token: encode it alone
            whole = context + tokenizer(separator + word, add_special_tokens=False)["input_ids"]
        scored = len(whole) - len(context)
        ids = whole[-max_length:]
        labels = [IGNORE_INDEX] * (len(ids) - scored) + ids[len(ids) - scored:]
        rows.append(EncodedExample(tuple(ids), tuple(labels)))
    return rows


@torch.no_grad()
def zero_shot_predictions(model: nn.Module, tokenizer, texts: Sequence[str], words: Sequence[str], prompt: str,
                          max_length: int) -> list[int]:
    """The index of the likeliest label word after each text's prompt (model: the base causal LM)."""
    labels_text = " or ".join(words)
    rows = [row for text in texts for row in word_rows(tokenizer, prompt.format(text=text.strip(), labels=labels_text),
                                                      words, max_length)]
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(rows), ROWS_PER_BATCH):
        batch = {k: v.to(device) for k, v in collate(rows[start: start + ROWS_PER_BATCH],
                                                     tokenizer.pad_token_id).items()}
        scores.append(reply_logps(model, batch)[0].cpu())
    per_text = torch.cat(scores).view(len(texts), len(words))  # (texts, labels) summed log-probabilities
    return per_text.argmax(dim=-1).tolist()


def zero_shot_accuracy(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[int],
                       words: Sequence[str], prompt: str, max_length: int) -> float:
    """Share of ``texts`` whose likeliest label word is their label's (``labels``: indices into ``words``)."""
    was_training = model.training
    model.eval()
    predicted = zero_shot_predictions(model, tokenizer, texts, words, prompt, max_length)
    model.train(was_training)
    return sum(p == label for p, label in zip(predicted, labels)) / len(labels)
