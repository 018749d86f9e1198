"""Checking an export against the in-memory model: next-token logits on probe prompts and greedy replies.

What is compared, per format and quantisation (``TOLERANCES``):

- the largest |logit difference| over every probe position and vocabulary entry, divided by the
  largest |logit| of the reference (so one number means the same for a 512- and a 49k-token vocabulary);
- the share of probe positions whose most likely next token is the same (top-1 agreement);
- that the exported file's tokenizer turns the probe prompts into the same ids;
- that a greedy reply through the chat template stops at the end-of-turn token whenever the
  reference's reply does (the reference within ``REPLY_TOKENS``, the export within twice that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import render_prompt

PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write one sentence about a little dog."}],
    [{"role": "user", "content": "Once upon a time, there was a little girl named Lily."}],
)
REPLY_TOKENS = 48


@dataclass(frozen=True)
class Tolerance:
    """What an export may differ by: mean KL divergence, top-1 agreement, and (float32 formats) the logits."""

    kl_divergence: float
    top1_agreement: float
    relative_logit_difference: float = float("inf")


# hf and peft hold the same float32 weights: the logits must agree to rounding. GGUF limits are set
# from what stories260k and SmolLM2-135M measure (docs/export.md), with headroom; a wrong tensor
# layout or tokenizer gives a KL divergence of nats and a top-1 agreement near chance.
TOLERANCES = {
    "hf": Tolerance(1e-6, 1.0, 1e-4),
    "peft": Tolerance(1e-6, 1.0, 1e-4),
    "f16": Tolerance(1e-3, 0.95),
    "q8_0": Tolerance(0.05, 0.85),
    "q4_0": Tolerance(0.5, 0.5),
}


@dataclass(frozen=True)
class Probe:
    """What the reference model does on the probe prompts."""

    texts: list[str]  # each probe conversation rendered with the chat template
    prompts: list[list[int]]  # their token ids
    logits: list[torch.Tensor]  # (positions, vocab) for each prompt, float32
    replies: list[list[int]]  # greedy reply ids for each prompt
    stops: list[bool]  # whether each reply ended with the end-of-turn token
    end_of_turn_id: int


@dataclass(frozen=True)
class CheckResult:
    """How an export compares with the reference."""

    relative_logit_difference: float
    max_logit_difference: float
    kl_divergence: float  # mean KL(reference || export) of the next-token distributions, in nats
    top1_agreement: float
    reply_agreement: float  # share of reply tokens identical to the reference's, position by position
    stops: bool  # every reply that stopped in the reference also stopped here
    reference_stops: bool  # any of the reference's replies stopped within REPLY_TOKENS
    tokenizer_matches: Optional[bool]
    tolerance: Tolerance
    load_seconds: Optional[float] = None  # how long the loader took to load the file

    def stopping(self) -> str:
        if not self.stops:
            return "do NOT stop at the end-of-turn token where the trained model's do"
        if self.reference_stops:
            return "stop at the end-of-turn token"
        return f"run to the {REPLY_TOKENS}-token limit, as the trained model's do"

    @property
    def passed(self) -> bool:
        return (self.relative_logit_difference <= self.tolerance.relative_logit_difference
                and self.kl_divergence <= self.tolerance.kl_divergence
                and self.top1_agreement >= self.tolerance.top1_agreement and self.stops
                and self.tokenizer_matches is not False)

    def describe(self) -> str:
        return (f"max |logit difference| {self.max_logit_difference:.3g} ({100 * self.relative_logit_difference:.2f}% "
                f"of the largest logit), KL divergence {self.kl_divergence:.2e} nats (at most "
                f"{self.tolerance.kl_divergence:.0e}), top-1 "
                f"agreement {100 * self.top1_agreement:.1f}% (at least {100 * self.tolerance.top1_agreement:.0f}%), "
                f"greedy replies {self.stopping()} "
                f"({100 * self.reply_agreement:.0f}% of reply tokens identical)")


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template puts after an assistant reply (``<|im_end|>``, or EOS).

    Raises:
        TunesmithError: If the template ends assistant turns with no special token.
    """
    marker = "\u2063reply\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text.split(marker, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    if ids and ids[0] in special:
        return ids[0]
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise TunesmithError("the chat template ends an assistant turn with no special token, so exported runtimes could "
                         "not know where to stop; train with data.template: chatml or simple")


def probe_conversation(tokenizer, conversation: list[dict]) -> list[dict]:
    """``conversation`` as the chat template accepts it: a template that refuses a system turn (Gemma 2's
    raises "System role not supported") gets it folded into the first user turn."""
    from jinja2 import TemplateError

    try:
        render_prompt(tokenizer, conversation)
        return conversation
    except TemplateError:
        if conversation[0]["role"] != "system":
            raise
    system, user, *rest = conversation
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *rest]


@torch.no_grad()
def probe_reference(model, tokenizer) -> Probe:
    """Run the reference model on the probe prompts (logits and greedy replies)."""
    stop = end_of_turn_id(tokenizer)
    texts = [render_prompt(tokenizer, probe_conversation(tokenizer, conversation))
             for conversation in PROBE_CONVERSATIONS]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    logits = [next_token_logits(model, ids) for ids in prompts]
    replies = [greedy_reply(model, ids, stop) for ids in prompts]
    return Probe(texts, prompts, logits, replies, [bool(r) and r[-1] == stop for r in replies], stop)


def next_token_logits(model, ids: list[int]) -> torch.Tensor:
    """(positions, vocab) float32 logits of a plain HF causal LM."""
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def greedy_reply(model, ids: list[int], stop: int, limit: int = REPLY_TOKENS) -> list[int]:
    device = next(model.parameters()).device
    output = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids),
                            dtype=torch.long, device=device), max_new_tokens=limit, do_sample=False,
                            eos_token_id=stop, pad_token_id=stop)
    return output[0, len(ids):].tolist()


def check_probe(probe: Probe, tolerance: Tolerance, logits_of: Callable[[list[int]], torch.Tensor],
            reply_of: Callable[[list[int], int, int], list[int]], tokenize: Optional[Callable[[int], list[int]]] = None
            ) -> CheckResult:
    """Compare an export, seen through ``logits_of(ids)`` and ``reply_of(ids, stop, limit)``, with ``probe``.

    Args:
        tokenize: ``tokenize(i)`` gives the export's own ids for probe conversation ``i`` (GGUF
            carries its own tokenizer); None when the export reuses the reference's tokenizer files.
    """
    largest = max(float(reference.abs().max()) for reference in probe.logits)
    difference, agree, positions, divergence = 0.0, 0, 0, 0.0
    for ids, reference in zip(probe.prompts, probe.logits):
        logits = logits_of(ids).float()[-reference.shape[0]:]  # prompt tuning through plain peft adds virtual positions
        difference = max(difference, float((logits - reference).abs().max()))
        agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        positions += reference.shape[0]
        divergence += float(kl_divergence(reference, logits).sum())
    same_tokens, total_tokens, stops = 0, 0, True
    for ids, reference_reply, reference_stops in zip(probe.prompts, probe.replies, probe.stops):
        # twice the reference's budget: a quantised model may take a different, longer way to the same stop
        reply = reply_of(ids, probe.end_of_turn_id, 2 * REPLY_TOKENS if reference_stops else REPLY_TOKENS)
        same_tokens += sum(a == b for a, b in zip(reply, reference_reply))
        total_tokens += max(len(reply), len(reference_reply))
        if reference_stops and not (reply and reply[-1] == probe.end_of_turn_id):
            stops = False
    matches = None if tokenize is None else all(tokenize(i) == ids for i, ids in enumerate(probe.prompts))
    return CheckResult(difference / largest, difference, divergence / positions, agree / positions, same_tokens / max(total_tokens, 1), stops,
                       any(probe.stops), matches, tolerance)


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per position, in nats: (positions,)."""
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def check_hf_model(probe: Probe, model, tolerance: Tolerance, tokenize=None) -> CheckResult:
    """Compare a reloaded transformers/peft model with ``probe``."""
    with torch.no_grad():
        return check_probe(probe, tolerance, lambda ids: next_token_logits(model, ids),
                       lambda ids, stop, limit: greedy_reply(model, ids, stop, limit), tokenize)


def require(result: CheckResult, what: str) -> None:
    """Raise with the measured numbers when an export fails its check.

    Raises:
        TunesmithError: Naming what failed and by how much.
    """
    if result.passed:
        return
    reasons = []
    tolerance = result.tolerance
    if result.relative_logit_difference > tolerance.relative_logit_difference:
        reasons.append(f"its logits differ by {100 * result.relative_logit_difference:.3f}% of the largest logit, "
                       f"{result.relative_logit_difference / tolerance.relative_logit_difference:.1f}x the tolerance "
                       f"of {100 * tolerance.relative_logit_difference:.3f}%")
    if result.kl_divergence > tolerance.kl_divergence:
        reasons.append(f"its next-token distributions differ by a KL divergence of {result.kl_divergence:.3g} nats, "
                       f"{result.kl_divergence / tolerance.kl_divergence:.1f}x the tolerance of {tolerance.kl_divergence:g}")
    if result.top1_agreement < tolerance.top1_agreement:
        reasons.append(f"its most likely next token agrees at {100 * result.top1_agreement:.1f}% of positions, "
                       f"below {100 * tolerance.top1_agreement:.0f}%")
    if not result.stops:
        reasons.append("its greedy replies do not stop at the end-of-turn token")
    if result.tokenizer_matches is False:
        reasons.append("its tokenizer gives other token ids for the probe prompts")
    raise TunesmithError(f"{what} failed its check ({'; '.join(reasons)}); nothing was kept. Try a finer --quantize "
                         "(q8_0 or f16) or --format hf")
