"""``stage: kto``: single replies labelled desirable or undesirable (https://arxiv.org/abs/2402.01306).

As in TRL, the KL term ``z`` is estimated from mismatched pairs: the prompts of a micro-batch with
its replies rotated by one, ``(x_1, y_n), (x_2, y_1), ...``; it is detached and clamped at 0. So
``z`` is estimated per micro-batch (TRL: per device batch), and gradient accumulation is not exactly
one large batch for this stage. A micro-batch of one example has no mismatched pair (``z`` is then
that example's own ratio); use ``train.batch_size`` of 2 or more.

Metrics on held-out labelled examples: the implicit reward ``beta * (log pi - log ref)`` signed by
the label (positive = the model agrees with the label), its mean (``margin``) and the share of
examples where it is positive (``accuracy``).
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.data.encode import EncodedExample
from tunesmith.data.preference import KTO_LAYOUT, EncodedLabelledReply, EncodedReply, encode_labelled
from tunesmith.stages.base import STAGES
from tunesmith.stages.losses import kto
from tunesmith.stages.pairs import PairValues, ReferenceObjective, ReferenceStage, split_pairs
from tunesmith.stages.scoring import reply_logps


class KtoObjective(ReferenceObjective):
    """The KTO loss of each labelled reply; a batch holds the matched sequences, then the mismatched ones."""

    counted = "examples"

    def sequences(self, examples: list[EncodedLabelledReply]) -> list[EncodedExample]:
        matched = [EncodedReply(e.prompt_ids, e.reply_ids).example(e.max_length) for e in examples]
        rotated = examples[-1:] + examples[:-1]
        mismatched = [EncodedReply(e.prompt_ids, r.reply_ids).example(e.max_length) for e, r in zip(examples, rotated)]
        return matched + mismatched

    def extras(self, examples: list[EncodedLabelledReply]) -> dict[str, torch.Tensor]:
        return {"desirable": torch.tensor([e.desirable for e in examples])}

    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        logps, _ = reply_logps(model, batch)
        reference_logps = self.reference_logps(model, batch)
        (policy, policy_kl), (reference, reference_kl) = split_pairs(logps), split_pairs(reference_logps)
        kl = (policy_kl - reference_kl).mean().clamp(min=0).detach()
        config, desirable = self.config, batch["desirable"]
        loss = kto(policy, reference, desirable, kl, config.beta, config.desirable_weight, config.undesirable_weight)
        signed = torch.where(desirable, 1.0, -1.0) * config.beta * (policy - reference).detach()
        return loss, {"accuracy": (signed > 0).float(), "margin": signed, "kl": kl.expand_as(signed)}


@STAGES.register_kind
class KahnemanTverskyOptimisation(ReferenceStage):
    """Conversations ending in a reply, each with a boolean ``label``; against the frozen reference."""

    kind = "kto"
    objective_class = KtoObjective
    encode = staticmethod(encode_labelled)
    layout = KTO_LAYOUT
