"""``stage: grpo``: online RL with group-relative advantages (GRPO, Dr. GRPO, DAPO) or RLOO's baseline.

Each optimizer step, for every prompt of the step: sample ``group_size`` completions (batched, with
the KV cache, from the torch RNG that checkpoints save), score them with the rewards, turn the
rewards into advantages within each group, and take ``num_iterations`` gradient steps on the
clipped-ratio loss with a KL penalty to the reference (the model before training, held by
:class:`~tunesmith.stages.pairs.Reference` as for DPO: the adapter switched off under PEFT, a frozen
copy otherwise). Sampling happens in :meth:`GroupPolicyObjective.rollout`, which the
loop calls for every micro-batch of the step before it counts the step's units, so DAPO's
token-level average spans the whole global batch, as TRL's does.

Why PPO is not a stage: see docs/rl.md ("Why no PPO").
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tunesmith.config import DataSection
from tunesmith.core.runtime import Runtime
from tunesmith.data.encoded import EncodedData
from tunesmith.inference.decoding import decode_padded  # the one decoding path (tunesmith generate, eval, serve)
from tunesmith.inference.generate import stop_token_ids
from tunesmith.stages import policy_loss as pl
from tunesmith.stages.base import STAGES, Stage
from tunesmith.stages.pairs import Reference
from tunesmith.stages.prompts import PromptExample, load_prompts
from tunesmith.stages.rewards import RewardSet, build_rewards
from tunesmith.training.chunked_loss import unwrap
from tunesmith.training.objective import Objective
from tunesmith.training.speed import SpeedSetup


@STAGES.register_kind
class GroupRelativePolicyOptimisation(Stage):
    """Prompts (with reference answers where rewards need them) -> sampled groups -> policy-gradient steps."""

    kind = "grpo"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.tokenizer = None
        self.rewards: Optional[RewardSet] = None
        self.reference: Optional[Reference] = None

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        self.tokenizer = tokenizer
        self.rewards = build_rewards(self.config.rewards, tokenizer)  # fails early: imports, reward models
        return load_prompts(section, tokenizer, seed, self.config.max_new_tokens, self.rewards.needs_reference)

    def after_method(self, model: nn.Module) -> None:
        """The KL reference, as DPO's: the adapter switched off under PEFT, else a frozen copy (beta 0: none)."""
        if self.config.beta > 0:
            self.reference = Reference(model)

    def objective(self, speed: SpeedSetup) -> "GroupPolicyObjective":
        reference, self.reference = self.reference, None  # the objective alone holds it
        return GroupPolicyObjective(self.config, self.tokenizer, self.rewards, reference, speed.autocast_dtype)


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including each row's first stop token, 0 after it, (N, T)."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    seen_before = (is_stop.cumsum(dim=1) - is_stop.long()) > 0  # a stop token earlier in the row
    return (~seen_before).long()


def token_logps(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of the completion tokens under ``model`` at ``temperature``, (N, T).

    Only the last T + 1 positions get logits (``logits_to_keep``: the prompt's would be most of a
    (N, P + T, vocabulary) tensor). Logits are divided by the sampling temperature, as TRL does, so
    the ratio and KL refer to the distribution sampled from. Positions are not passed: with rotary
    embeddings a row's constant left-padding offset leaves attention unchanged.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    length = completion_ids.shape[1]
    # The kept positions as an index tensor, not ``length + 1``: transformers then hands the head a contiguous
    # copy rather than a strided slice, which a bfloat16 base's head multiplies 10-400x slower on CPU (oneDNN;
    # measured 2.0 s against 0.09 s for 8 rows of 160 tokens keeping 65, SmolLM2's head).
    keep = torch.arange(input_ids.shape[1] - length - 1, input_ids.shape[1], device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    logits = logits[:, -length - 1 : -1].float() / temperature  # (N, T, vocab): each predicts the next completion token
    chosen = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


class StepRecord:
    """What one step's rollouts and losses measured, summed over its micro-batches."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.completions, self.reward_sums, self.total = 0, [0.0] * len(self.names), 0.0
        self.length, self.truncated, self.kl, self.kl_tokens, self.generate_s = 0, 0, 0.0, 0, 0.0
        self.samples: list[dict] = []

    def add_rollout(self, per_reward: torch.Tensor, total: torch.Tensor, mask: torch.Tensor, truncated: int,
                    kl: float, kl_tokens: int, seconds: float) -> None:
        """One micro-batch's rollouts; ``kl``/``kl_tokens``: a KL summed over tokens at sampling (rloo), else 0."""
        self.kl += kl
        self.kl_tokens += kl_tokens
        self.completions += per_reward.shape[0]
        self.reward_sums = [s + float(v) for s, v in zip(self.reward_sums, per_reward.sum(dim=0))]
        self.total += float(total.sum())
        self.length += int(mask.sum())
        self.truncated += truncated
        self.generate_s += seconds

    def metrics(self) -> dict:
        count = max(self.completions, 1)
        metrics = {"reward": self.total / count, **{f"reward/{n}": s / count for n, s in zip(self.names, self.reward_sums)},
                   "completion_length": self.length / count, "truncated_share": self.truncated / count,
                   "generate_s": self.generate_s}
        if self.kl_tokens:
            metrics["kl"] = self.kl / self.kl_tokens
        if self.samples:
            metrics["samples"] = self.samples
        return metrics


class GroupPolicyObjective(Objective):
    """The loop's objective for ``stage: grpo`` (see the module docstring).

    Args:
        config: The ``stage`` section (:class:`~tunesmith.config.GrpoStage`).
        tokenizer: The model's tokenizer (decodes completions for the rewards).
        rewards: The stage's rewards.
        reference: The KL reference (:class:`~tunesmith.stages.pairs.Reference`), or None when beta is 0.
        autocast_dtype: The run's autocast dtype (generation and log-probabilities), or None.
    """

    def __init__(self, config, tokenizer, rewards: RewardSet, reference: Optional[Reference],
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        self.config, self.tokenizer, self.rewards, self.reference = config, tokenizer, rewards, reference
        self.autocast_dtype = autocast_dtype
        self.stop_ids = stop_token_ids(tokenizer)
        self.step = StepRecord(rewards.names)
        self.rollouts: dict[int, tuple] = {}  # micro-batch position -> rollout, for the generation in hand
        self.generation: Optional[int] = None
        self.last_step: Optional[int] = None
        self.position = 0
        self.placed = False

    # ---- what the loop calls ----------------------------------------------------------------------

    def collate(self, examples: list[PromptExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Left-padded prompts (the loop hands :meth:`rollout` the examples themselves)."""
        prompt_ids, prompt_mask = left_pad([e.input_ids for e in examples], pad_token_id)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}

    @property
    def updates_per_batch(self) -> int:
        return self.config.num_iterations

    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: dict[str, torch.Tensor], examples: list[PromptExample],
                step: int = 0) -> dict[str, torch.Tensor]:
        """The rollouts of this micro-batch: sampled on the first of ``num_iterations`` steps, then reused.

        The sampler gives the steps of one generation the same prompts; a reused rollout's rewards are
        logged again (they are what the step trains on), with no generation time. After a resume in the
        middle of a generation its rollouts are sampled afresh.
        """
        if step != self.last_step:
            self.last_step, self.position = step, 0
        position, self.position = self.position, self.position + 1
        generation = step // self.config.num_iterations
        if generation != self.generation:
            self.generation, self.rollouts = generation, {}
        if position in self.rollouts:
            rolled, measured = self.rollouts[position]
            self.step.add_rollout(*measured, seconds=0.0)
            return rolled
        rolled, measured = self.generate(model, batch, examples)
        if self.config.num_iterations > 1:
            self.rollouts[position] = (rolled, measured)
        return rolled

    def generate(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 examples: list[PromptExample]) -> tuple[dict[str, torch.Tensor], tuple]:
        """Sample the groups, score them and compute their advantages (and reference and old log-probabilities).

        Returns:
            The batch to train on, and what :meth:`StepRecord.add_rollout` logs of it (but the seconds).
        """
        policy = unwrap(model)
        self.place(policy)
        device = next(policy.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        group = self.config.group_size
        prompt_ids = batch["prompt_ids"].repeat_interleave(group, dim=0)  # (N, P)
        prompt_mask = batch["prompt_mask"].repeat_interleave(group, dim=0)
        started = time.perf_counter()
        completion_ids = self.sample(policy, prompt_ids, prompt_mask, greedy=False)  # (N, T)
        seconds = time.perf_counter() - started
        mask = completion_mask(completion_ids, self.stop_ids)
        repeated = [example for example in examples for _ in range(group)]
        per_reward, texts = self.score(repeated, completion_ids, mask)
        total = raw = self.rewards.total(per_reward)  # (N,); rloo subtracts its KL penalty from total below
        out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
               "completion_mask": mask}
        ref_logps = self.reference_logps(policy, prompt_ids, prompt_mask, completion_ids, mask) \
            if self.config.beta > 0 else None
        old, kl, kl_tokens = None, 0.0, 0
        if self.config.num_iterations > 1 or (self.config.estimator == "rloo" and ref_logps is not None):
            with self.autocast(policy):  # the sampling policy, before this generation's updates (TRL's old logps)
                old = token_logps(policy, prompt_ids, prompt_mask, completion_ids, mask, self.config.temperature)
        if self.config.num_iterations > 1:
            out["old_logps"] = old
        if self.config.estimator == "rloo":
            if ref_logps is not None:
                total = total - self.config.beta * pl.sequence_kl(old, ref_logps, mask)
                kl, kl_tokens = float(((old - ref_logps) * mask).sum()), int(mask.sum())  # the penalty's log ratio
            out["advantages"] = pl.leave_one_out_advantages(total, group, self.config.normalize_advantages)
        else:
            out["advantages"] = pl.group_advantages(total, group, self.config.scale_rewards)
            if ref_logps is not None:
                out["ref_logps"] = ref_logps
        measured = (per_reward, raw, mask, self.truncated(completion_ids, mask), kl, kl_tokens)
        self.step.add_rollout(*measured, seconds=seconds)
        if not self.step.samples:  # the step's first prompt, two of its completions
            self.step.samples = [{"prompt": examples[0].prompt_text, "completion": texts[i],
                                  "reward": round(float(raw[i]), 4)} for i in range(min(2, group))]
        return out, measured

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The clipped-ratio loss (plus KL) summed over the units of the loss type."""
        config, mask = self.config, batch["completion_mask"]
        with self.autocast(unwrap(model)):
            logps = token_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
                                config.temperature)
        # num_iterations 1: the sampling policy is the current one, ratio 1 (as TRL); else the one that sampled
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
        if config.estimator == "rloo":
            return pl.clipped_sequence_loss(logps, old, batch["advantages"], mask, config.epsilon, high).sum()
        per_token = pl.clipped_token_loss(logps, old, batch["advantages"], config.epsilon, high)
        if "ref_logps" in batch:
            kl = pl.token_kl(logps, batch["ref_logps"])
            per_token = per_token + config.beta * kl
            self.step.kl += float((kl.detach() * mask).sum())
            self.step.kl_tokens += int(mask.sum())
        return pl.summed_token_loss(per_token, mask, config.loss_type)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        loss_type = "grpo" if self.config.estimator == "rloo" else self.config.loss_type
        return pl.loss_units(batch["completion_mask"], loss_type, self.config.max_new_tokens)

    def real_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["prompt_mask"].sum()) + int(batch["completion_mask"].sum())

    def step_metrics(self) -> dict:
        """Rewards (total and each), completion length, KL, generation seconds and samples of the step just taken."""
        metrics = self.step.metrics()
        self.step.reset()
        return metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples, batch_size: int, pad_token_id: int,
                 runtime: Runtime) -> dict[str, float]:
        """Greedy completions of the held-out prompts: mean reward (total, each), accuracy; loss = -reward.

        Greedy decoding draws nothing from the RNG, so evaluating never changes what training samples.
        """
        policy = unwrap(model)
        self.place(policy)
        mine = list(examples)[runtime.rank :: runtime.world_size]
        totals = torch.zeros(len(self.rewards.names) + 3, dtype=torch.float64)  # rewards..., total, length, count
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            prompt_ids, prompt_mask = (t.to(runtime.device) for t in left_pad([e.input_ids for e in chunk], pad_token_id))
            completion_ids = self.sample(policy, prompt_ids, prompt_mask, greedy=True)
            mask = completion_mask(completion_ids, self.stop_ids)
            per_reward, _ = self.score(chunk, completion_ids, mask)
            totals[:-3] += per_reward.sum(dim=0).double().cpu()
            totals[-3] += float(self.rewards.total(per_reward).sum())
            totals[-2] += float(mask.sum())
            totals[-1] += len(chunk)
        if runtime.distributed:
            totals = totals.to(runtime.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        count = max(float(totals[-1]), 1.0)
        metrics = {f"reward/{name}": float(totals[i]) / count for i, name in enumerate(self.rewards.names)}
        metrics.update(reward=float(totals[-3]) / count, completion_length=float(totals[-2]) / count)
        if self.rewards.accuracy_reward is not None:
            metrics["accuracy"] = metrics[f"reward/{self.rewards.accuracy_reward}"]
        return {"loss": -metrics["reward"], **metrics}

    # ---- pieces -----------------------------------------------------------------------------------

    def place(self, policy: nn.Module) -> None:
        """Once: put reward models (and the reference's frozen copy, if any) on the policy's device."""
        if self.placed:
            return
        device = next(policy.parameters()).device
        self.rewards.to(device)
        if self.reference is not None and self.reference.copy is not None:
            self.reference.copy.to(device)
        self.placed = True

    def truncated(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> int:
        """Completions cut at max_new_tokens before any stop token."""
        if completion_ids.shape[1] < self.config.max_new_tokens:
            return 0
        last_is_stop = torch.isin(completion_ids[:, -1], torch.tensor(self.stop_ids, device=completion_ids.device))
        return int(((mask[:, -1] == 1) & ~last_is_stop).sum())

    def autocast(self, model: nn.Module):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(model.parameters()).device.type, dtype=self.autocast_dtype)

    def sample(self, policy: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Completions (N, T) of left-padded prompts, batched with the KV cache; sampling draws from the torch RNG."""
        config = self.config

        options = {} if greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}
        was_training = policy.training
        policy.eval()
        try:
            with self.autocast(policy), torch.no_grad():
                return decode_padded(policy, prompt_ids, prompt_mask, config.max_new_tokens, self.stop_ids,
                                     self.tokenizer.pad_token_id, **options)
        finally:
            policy.train(was_training)

    def score(self, examples: list[PromptExample], completion_ids: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """(N, rewards) scores of the completions, and their texts (stop token and after removed)."""
        lengths = mask.sum(dim=1).tolist()
        kept = [row[: n].tolist() for row, n in zip(completion_ids, lengths)]
        texts = [text.strip() for text in self.tokenizer.batch_decode(kept, skip_special_tokens=True)]
        conversations = [[*e.messages, {"role": "assistant", "content": text}] for e, text in zip(examples, texts)]
        per_reward = self.rewards.score([e.prompt_text for e in examples], texts, [e.reference for e in examples],
                                        lengths, conversations)
        return per_reward.to(completion_ids.device), texts

    def reference_logps(self, policy: nn.Module, prompt_ids, prompt_mask, completion_ids, mask) -> torch.Tensor:
        """Log-probabilities under the reference: the adapter disabled (PEFT) or the frozen copy."""
        temperature = self.config.temperature
        with self.autocast(policy):
            return self.reference.logps(policy, {}, forward=lambda model, _: token_logps(
                model, prompt_ids, prompt_mask, completion_ids, mask, temperature))


def left_pad(sequences: list[tuple[int, ...]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (batch, longest), padded on the left for generation."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, longest - len(sequence) :] = torch.tensor(sequence)
            mask[row, longest - len(sequence) :] = 1
    return ids, mask
