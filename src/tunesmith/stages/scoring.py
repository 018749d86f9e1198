"""What the judgement stages read from a model: summed reply log-probabilities, and a scalar or label head.

Log-probabilities are computed for padded batches and for packed rows (one row holding several
sequences, with ``cu_seq_lens_q`` boundaries) alike, so the preference stages keep the packing lever.
The head reads the final hidden state of each sequence's last real token (an encoder's: the mean over
its real tokens, see :func:`sequence_scores`); it is not an
``nn.Linear`` so that no method (``targets: all-linear``) puts an adapter on it, and it trains
whatever the method freezes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.methods.base import base_model_of
from tunesmith.models import is_encoder

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")
HEAD_ATTRIBUTE = "tunesmith_head"
HEAD_FILE = "head.safetensors"


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model reads (the rest are the stage's own)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def sequence_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which sequence each input position belongs to: (rows, seq); a packed row holds several."""
    input_ids = batch["input_ids"]
    if "cu_seq_lens_q" in batch:
        lengths = batch["cu_seq_lens_q"].diff().long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)[None]
    return torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)


def count_sequences(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in batch else batch["input_ids"].shape[0]


def reply_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, and how many there are.

    Args:
        model: A causal LM (peft- or DDP-wrapped or not) returning one logit row per input token.
        batch: A padded (sequences, seq) or packed (1, total) batch with ``labels``.

    Returns:
        (sequences,) float32 sums of log p(label | prefix), and (sequences,) scored-token counts.
    """
    logits = model(**model_inputs(batch), use_cache=False).logits  # (rows, seq, vocab)
    labels = batch["labels"][:, 1:]
    token_logps = -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view(labels.shape)  # (rows, seq - 1), 0 where not scored
    owner = sequence_ids(batch)[:, 1:].flatten()
    sequences = count_sequences(batch)
    sums = token_logps.new_zeros(sequences).index_add(0, owner, token_logps.flatten())
    counts = token_logps.new_zeros(sequences).index_add(0, owner, (labels != IGNORE_INDEX).flatten().float())
    return sums, counts


class ScoreHead(nn.Module):
    """``outputs`` scores from a hidden state: a weight matrix and a bias (deliberately not an nn.Linear)."""

    def __init__(self, hidden: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, hidden))
        self.bias = nn.Parameter(torch.zeros(outputs))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden + 1))  # as transformers' score heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


def add_head(model: nn.Module, outputs: int) -> nn.Module:
    """Attach a :class:`ScoreHead` to a loaded causal LM or encoder (same device and dtype); returns the model."""
    hidden = model.config.hidden_size
    reference = model.get_input_embeddings().weight
    model.add_module(HEAD_ATTRIBUTE, ScoreHead(hidden, outputs).to(reference.device, reference.dtype))
    return model


def head_of(model: nn.Module) -> ScoreHead:
    """The head inside whatever wraps the model (DDP, peft, virtual tokens)."""
    base = base_model_of(model)
    head = getattr(base, HEAD_ATTRIBUTE, None)
    if head is None:
        raise TunesmithError("this model has no score head; train it with stage rm or cls")
    return head


def sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's scores for each sequence: (sequences, outputs).

    A causal LM is read at each sequence's last real token (the only one that has seen the whole
    text); an encoder (BERT, MiniLM) by the mean of its real tokens' final hidden states, the pooling
    sentence encoders such as all-MiniLM-L6-v2 were trained with (its [CLS] state was not trained to
    summarise the text). The model runs its own forward (so DDP and peft see a normal call); a causal
    LM with ``logits_to_keep`` empty, so no vocabulary logits are computed.
    """
    input_ids = batch["input_ids"]
    head = head_of(model)
    if is_encoder(base_model_of(model).config):
        if "cu_seq_lens_q" in batch:
            raise TunesmithError("an encoder's batches cannot be packed (its attention is bidirectional)")
        hidden = model(**model_inputs(batch)).last_hidden_state[:, -input_ids.shape[1]:]  # (rows, seq, hidden)
        mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (rows, seq, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)  # (rows, hidden)
        return head(pooled.to(head.weight.dtype)).float()
    no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    output = model(**model_inputs(batch), use_cache=False, output_hidden_states=True, logits_to_keep=no_positions)
    hidden = output.hidden_states[-1][:, -input_ids.shape[1]:]  # (rows, seq, hidden); virtual tokens dropped
    if "cu_seq_lens_q" in batch:
        last = batch["cu_seq_lens_q"][1:].long() - 1
        pooled = hidden[0, last]  # (sequences, hidden)
    else:
        last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(pooled.to(head.weight.dtype)).float()


def save_head(model: nn.Module, directory: Path) -> None:
    """Write the head beside the method's artifact (``head.safetensors``)."""
    from safetensors.torch import save_file

    head = head_of(model)
    save_file({name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()},
              str(directory / HEAD_FILE))


def load_head(model: nn.Module, directory: Path) -> nn.Module:
    """Attach the head saved in ``directory`` to a model (base + method result) loaded for inference.

    Raises:
        TunesmithError: If the folder holds no head (it was not trained by stage rm or cls).
    """
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise TunesmithError(f"{directory} holds no {HEAD_FILE}: it is not the result of stage rm or cls")
    state = load_file(str(path))
    base = base_model_of(model)
    add_head(base, state["weight"].shape[0])
    head_of(model).load_state_dict(state)
    return model
