"""Rewards of the online-RL stage: one small interface, built-in verifiable rewards, user functions, reward models.

A reward is a callable ``(prompts, completions, references, completion_lengths, conversations) ->
list[float]``, all lists of the same length: prompts as rendered for generation, ``references``
None where the data has no answer, ``conversations`` the prompt turns followed by the completion as
the assistant's turn. The built-ins are pure functions of the text; a user function named
``module:function`` is called with the keywords it accepts (so TRL-style ``def f(completions,
**kwargs)`` works); a reward model scores each completion with its scalar head: a
sequence-classification folder reads the rendered prompt plus completion, a result of ``stage: rm``
reads the conversation encoded as that stage trained on it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from tunesmith.config.rewards import (
    REFERENCE_KINDS,
    AnswerMatchReward,
    ExactMatchReward,
    FormatReward,
    FunctionReward,
    LengthReward,
    ModelReward,
)
from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import Registry
from tunesmith.data.answers import extract_answer, reference_answer, same_answer

RewardFunction = Callable[..., list[float]]
"""``(prompts, completions, references, completion_lengths, conversations) -> one score per completion``."""


@dataclass(frozen=True)
class NamedReward:
    """A reward as the stage uses it.

    Attributes:
        name: Name in logs and metrics.
        weight: Weight in the sum.
        score: The reward function.
        needs_reference: The data must give every prompt a reference answer.
    """

    name: str
    weight: float
    score: RewardFunction
    needs_reference: bool = False


class RewardSet:
    """The stage's rewards: scores each, checks what they return, and sums them with their weights."""

    def __init__(self, rewards: Sequence[NamedReward]) -> None:
        names = [reward.name for reward in rewards]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise TunesmithError(f"stage.rewards: two rewards are named {duplicated[0]!r}; give each a distinct name")
        self.rewards = tuple(rewards)
        self.weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float32)

    @property
    def names(self) -> list[str]:
        return [reward.name for reward in self.rewards]

    @property
    def needs_reference(self) -> bool:
        return any(reward.needs_reference for reward in self.rewards)

    @property
    def accuracy_reward(self) -> Optional[str]:
        """The first reward that compares with a reference: its mean is reported as ``accuracy``."""
        return next((reward.name for reward in self.rewards if reward.needs_reference), None)

    def score(self, prompts: list[str], completions: list[str], references: list[Optional[str]],
              lengths: list[int], conversations: Optional[list[list[dict[str, str]]]] = None) -> torch.Tensor:
        """(N, rewards) float32 scores, column k from reward k.

        Raises:
            TunesmithError: If a reward raises or returns other than one number per completion; the
                message names the reward and the prompt.
        """
        columns = [self._checked(reward, prompts, completions, references, lengths, conversations)
                   for reward in self.rewards]
        return torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(self.rewards))

    def to(self, device: torch.device | str) -> "RewardSet":
        """Move reward models to ``device`` (the policy's)."""
        for reward in self.rewards:
            if isinstance(reward.score, (ScalarRewardModel, StageRewardModel)):
                reward.score.to(device)
        return self

    def total(self, per_reward: torch.Tensor) -> torch.Tensor:
        """(N,) weighted sum of (N, rewards) scores."""
        return per_reward @ self.weights.to(per_reward.device)

    @staticmethod
    def _checked(reward: NamedReward, prompts, completions, references, lengths, conversations) -> list[float]:
        try:
            values = reward.score(prompts, completions, references, lengths, conversations)
        except TunesmithError:
            raise
        except Exception as error:  # a user's function: name it and the prompt instead of a traceback
            raise TunesmithError(f"reward {reward.name!r} raised {type(error).__name__}: {error} "
                                 f"(scoring a completion of prompt {_short(prompts[0])!r})") from None
        values = list(values) if isinstance(values, (list, tuple, torch.Tensor)) else values
        if not isinstance(values, list) or len(values) != len(completions):
            raise TunesmithError(f"reward {reward.name!r} must return a list of {len(completions)} numbers, one per "
                                 f"completion, got {type(values).__name__} (prompt {_short(prompts[0])!r})")
        for index, value in enumerate(values):
            number = float(value) if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) \
                else None
            if number is None or not math.isfinite(number):
                raise TunesmithError(f"reward {reward.name!r} returned {value!r}, not a finite number, for a "
                                     f"completion of prompt {_short(prompts[index])!r}")
            values[index] = number
        return values


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- built-in verifiable rewards -------------------------------------------------------------------

def _normalised(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def exact_match(case_sensitive: bool = False) -> RewardFunction:
    """1.0 where the completion equals the reference (whitespace runs collapsed; case ignored unless asked)."""
    def score(prompts, completions, references, lengths, conversations=None):
        return [float(_normalised(c, case_sensitive) == _normalised(r, case_sensitive))
                for c, r in zip(completions, references)]

    return score


def answer_match(pattern: str) -> RewardFunction:
    """1.0 where the completion's answer equals the reference's (:mod:`tunesmith.data.answers`: evaluation's rule)."""
    compiled = re.compile(pattern)

    def score(prompts, completions, references, lengths, conversations=None):
        scores = []
        for completion, reference in zip(completions, references):
            found = extract_answer(completion, compiled)
            scores.append(float(found is not None and same_answer(found, reference_answer(reference, compiled))))
        return scores

    return score


def required_format(pattern: str, match: str = "search") -> RewardFunction:
    """1.0 where the completion matches ``pattern`` (anywhere, or as a whole with ``match='full'``)."""
    compiled = re.compile(pattern, re.DOTALL)
    test = compiled.fullmatch if match == "full" else compiled.search

    def score(prompts, completions, references, lengths, conversations=None):
        return [float(test(completion.strip() if match == "full" else completion) is not None)
                for completion in completions]

    return score


def length_penalty(target: int, tolerance: int = 0) -> RewardFunction:
    """0 within ``tolerance`` tokens of ``target``; beyond, -(distance - tolerance) / target, down to -1."""
    def score(prompts, completions, references, lengths, conversations=None):
        return [-min(1.0, max(0, abs(n - target) - tolerance) / target) for n in lengths]

    return score


@contextlib.contextmanager
def working_folder_importable():
    """The working folder on ``sys.path`` while a user's module is imported (the console script leaves it off)."""
    folder = os.getcwd()
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def user_function(spec: str) -> RewardFunction:
    """The function named ``module:function``, called with the keywords it accepts.

    Raises:
        TunesmithError: If the module cannot be imported or has no such callable.
    """
    module_name, _, name = spec.partition(":")
    try:
        with working_folder_importable():
            module = importlib.import_module(module_name)
    except Exception as error:  # any import failure of the user's module is a configuration error
        raise TunesmithError(f"stage.rewards: cannot import module {module_name!r} of reward function {spec!r} "
                             f"({type(error).__name__}: {error}); put it on PYTHONPATH or in the working folder") \
            from None
    function = getattr(module, name, None)
    if not callable(function):
        raise TunesmithError(f"stage.rewards: module {module_name!r} has no function {name!r} (reward {spec!r})")
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def score(prompts, completions, references, lengths, conversations=None):
        offered = {"prompts": prompts, "completions": completions, "references": references,
                   "completion_lengths": lengths, "conversations": conversations}
        return function(**{k: v for k, v in offered.items() if takes_any or k in parameters})

    return score


# ---- reward models ---------------------------------------------------------------------------------

HEAD_FILE = "head.safetensors"  # the scalar head a result of ``stage: rm`` keeps beside its method artifact


def reward_model_folder(path: str) -> tuple[Path, str]:
    """The reward model named by ``path`` and how it loads: ``stage_rm`` or ``sequence_classification``.

    A result of ``stage: rm`` (its folder, or the run folder holding ``adapter/`` or ``model/``) has
    ``head.safetensors``; otherwise ``path`` or its ``model/`` is a sequence-classification folder.

    Raises:
        TunesmithError: If neither is found.
    """
    folder = Path(path)
    for candidate in (folder, folder / "adapter", folder / "model"):
        if (candidate / HEAD_FILE).is_file():
            return candidate, "stage_rm"
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file():
            return candidate, "sequence_classification"
    raise TunesmithError(f"stage.rewards: reward model {path} has no config.json (nor a model/ folder holding one); "
                         "give the folder of a sequence-classification model or of a run trained with stage: rm")


class StageRewardModel:
    """A result of ``stage: rm`` scoring conversations through that stage's own encoding."""

    def __init__(self, folder: Path, batch_size: int = 16, max_length: int = 1024) -> None:
        try:
            self.rm = importlib.import_module("tunesmith.stages.rm")
        except ModuleNotFoundError as error:
            if error.name != "tunesmith.stages.rm":
                raise
            raise TunesmithError(f"stage.rewards: {folder} is a result of stage: rm, which this tunesmith does not "
                                 "have; update tunesmith") from None
        self.model, self.tokenizer = self.rm.load_reward_model(folder)
        self.model.requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length

    def to(self, device: torch.device | str) -> "StageRewardModel":
        self.model.to(device)
        return self

    def __call__(self, prompts, completions, references, lengths, conversations=None) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            scores += self.rm.score_conversations(self.model, self.tokenizer,
                                                  conversations[start : start + self.batch_size], self.max_length)
        return scores


def load_reward_model(path: str, device: torch.device | str = "cpu"):
    """A frozen ``AutoModelForSequenceClassification`` with one output and its tokenizer.

    Raises:
        TunesmithError: If the folder holds no model, or the model has more than one output.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, _ = reward_model_folder(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise TunesmithError(f"stage.rewards: could not load reward model {folder}: "
                             f"{str(error).strip().splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise TunesmithError(f"stage.rewards: reward model {folder} has {model.config.num_labels} outputs; a reward "
                             "model gives one score (num_labels 1), as stage: rm trains")
    # The head finds each row's last real token by the config's pad id: pad with exactly that id.
    if model.config.pad_token_id is not None:
        tokenizer.pad_token_id = model.config.pad_token_id
    else:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer


def check_same_tokenizer(reward_tokenizer, policy_tokenizer, path: str) -> None:
    """Refuse a reward model whose vocabulary differs from the policy's (it would score other tokens).

    Raises:
        TunesmithError: If the two vocabularies differ.
    """
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise TunesmithError(f"stage.rewards: reward model {path} has another tokenizer than the model trained "
                             f"({len(reward_tokenizer)} vs {len(policy_tokenizer)} tokens); train the reward model "
                             "from the same base model")


class ScalarRewardModel:
    """Scores of ``prompt + completion`` (the prompt as rendered for generation) from a scalar head."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 1024) -> None:
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length

    def to(self, device: torch.device | str) -> "ScalarRewardModel":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts, completions, references, lengths, conversations=None) -> list[float]:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        self.tokenizer.padding_side = "right"
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                    truncation=True, max_length=self.max_length, add_special_tokens=False).to(device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores


def build_rewards(sections, policy_tokenizer, device: torch.device | str = "cpu") -> RewardSet:
    """The :class:`RewardSet` of the recipe's ``stage.rewards`` (reward models loaded on ``device``)."""
    built = []
    for section in sections:
        name = section.name or (section.function if isinstance(section, FunctionReward) else section.kind)
        built.append(NamedReward(name, section.weight, _build_one(section, policy_tokenizer, device),
                                 needs_reference=section.kind in REFERENCE_KINDS))
    return RewardSet(built)


RewardBuilder = Callable[[Any, Any, Any], RewardFunction]
"""``(section, policy_tokenizer, device) -> reward function``: how one ``stage.rewards`` kind is built."""

REWARDS: Registry[RewardBuilder] = Registry("reward kind")


def _build_one(section, policy_tokenizer, device) -> RewardFunction:
    return REWARDS.get(section.kind)(section, policy_tokenizer, device)


@REWARDS.register("exact_match")
def _exact_match(section: ExactMatchReward, policy_tokenizer, device) -> RewardFunction:
    return exact_match(section.case_sensitive)


@REWARDS.register("answer_match")
def _answer_match(section: AnswerMatchReward, policy_tokenizer, device) -> RewardFunction:
    return answer_match(section.pattern)


@REWARDS.register("format")
def _format(section: FormatReward, policy_tokenizer, device) -> RewardFunction:
    return required_format(section.pattern, section.match)


@REWARDS.register("length")
def _length(section: LengthReward, policy_tokenizer, device) -> RewardFunction:
    return length_penalty(section.target, section.tolerance)


@REWARDS.register("function")
def _function(section: FunctionReward, policy_tokenizer, device) -> RewardFunction:
    return user_function(section.function)


@REWARDS.register("model")
def _model(section: ModelReward, policy_tokenizer, device) -> RewardFunction:
    folder, kind = reward_model_folder(section.path)
    if kind == "stage_rm":
        scorer = StageRewardModel(folder, section.batch_size, section.max_length)
        check_same_tokenizer(scorer.tokenizer, policy_tokenizer, section.path)
        return scorer
    model, tokenizer = load_reward_model(section.path, device)
    check_same_tokenizer(tokenizer, policy_tokenizer, section.path)
    return ScalarRewardModel(model, tokenizer, section.batch_size, section.max_length)
