"""Rewards of the grpo stage (built-in, combined, reward models) and the prompt data it reads."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.config import DataSection
from tunesmith.config.rewards import GSM8K_ANSWER, ModelReward
from tunesmith.core.errors import TunesmithError
from tunesmith.stages.rewards import (
    NamedReward,
    RewardSet,
    answer_match,
    build_rewards,
    exact_match,
    length_penalty,
    required_format,
)

from conftest import REPO

NONE = [None, None, None]


def test_built_in_rewards():
    assert exact_match()([""] * 3, ["2025-10-06", " 2025-10-06 \n", "2025-10-6"], ["2025-10-06"] * 3, [0] * 3) \
        == [1.0, 1.0, 0.0]
    gsm8k = answer_match(GSM8K_ANSWER)
    reference = "Natalia sold 48/2 = 24 clips in May... 48+24 = 72\n#### 72"
    completions = ["so 48 + 24 = 72 #### 72", "#### 72.0", "the answer is 72", "#### 1,072", "#### 71\n#### 72",
                   "72 or #### 73"]
    # the last answer counts; without the pattern the last number (evaluation's rule, tunesmith.data.answers)
    assert gsm8k([""] * 6, completions, [reference] * 6, [0] * 6) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert answer_match(r"\d{4}-\d{2}-\d{2}")([""], ["It is 2025-10-06."], ["2025-10-06"], [0]) == [1.0]
    assert required_format(r"\d{4}-\d{2}-\d{2}", "full")([""] * 2, ["2025-10-06", "on 2025-10-06"], NONE[:2], [0, 0]) \
        == [1.0, 0.0]
    assert length_penalty(10, tolerance=2)([""] * 4, [""] * 4, [None] * 4, [10, 12, 15, 40]) == [0.0, 0.0, -0.3, -1.0]


def test_rewards_combine_with_weights_and_keep_each_column():
    rewards = RewardSet([NamedReward("right", 1.0, exact_match(), needs_reference=True),
                         NamedReward("short", 0.5, length_penalty(2))])
    per_reward = rewards.score(["p", "p"], ["a", "b"], ["a", "a"], [2, 4])
    torch.testing.assert_close(per_reward, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(rewards.total(per_reward), torch.tensor([1.0, -0.5]))
    assert rewards.accuracy_reward == "right" and rewards.needs_reference
    with pytest.raises(TunesmithError, match="two rewards are named 'right'"):
        RewardSet([NamedReward("right", 1.0, exact_match())] * 2)


def test_reward_model_folder_scores_like_its_sequence_classification_head(tiny_llama, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_llama, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model.config.pad_token_id = tokenizer.eos_token_id
    run = tmp_path / "rm_run"
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    rewards = build_rewards([ModelReward(path=str(run), name="rm")], tokenizer)  # a run folder: its model/ is used
    texts = (["User: hi\nAssistant: ", "User: tell a story\nAssistant: "], ["Hello there.", "Once upon a time"])
    scores = rewards.score(*texts, [None, None], [3, 4])[:, 0]
    with torch.no_grad():
        expected = [float(model(**tokenizer(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
                    for p, c in zip(*texts)]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.add_tokens(["<not-in-the-policy>"])
    other.save_pretrained(tmp_path / "other")
    model.save_pretrained(tmp_path / "other")
    with pytest.raises(TunesmithError, match="another tokenizer"):
        build_rewards([ModelReward(path=str(tmp_path / "other"))], tokenizer)
    with pytest.raises(TunesmithError, match="no config.json"):
        build_rewards([ModelReward(path=str(tmp_path))], tokenizer)


GSM8K_ROWS = [  # GSM8K's layout: a question, and a worked answer ending in "#### number"
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "5 * 6 = <<5*6=30>>30 eggs.\n#### 30"},
]


def test_prompts_from_gsm8k(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.stages.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    data = load_prompts(DataSection(train=str(test_file), template="simple", max_length=1024), tokenizer, 0, 32,
                           True)
    first = json.loads(test_file.read_text().splitlines()[0])
    assert data.train[0].messages[-1]["content"] == first["question"] and data.train[0].reference == first["answer"]
    assert data.train[0].prompt_text.endswith("Assistant: ")


def test_prompts_from_the_quickstart_and_conversations(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.stages.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    quickstart = REPO / "examples" / "data" / "quickstart"
    data = load_prompts(DataSection(train=str(quickstart / "train.jsonl"), validation=str(quickstart / "test.jsonl"),
                                       template="simple", max_length=128), tokenizer, 0, 16, True)
    assert data.validation[0].reference == "2025-10-06" and "6 October 2025" in data.validation[0].prompt_text
    assert len(data.train) == 400 and data.stats["train"].dropped == 0
    conversation = tmp_path / "turns.jsonl"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(TunesmithError, match="turns.jsonl, line 1: the conversation must end with the assistant"):
        load_prompts(DataSection(train=str(conversation), template="simple"), tokenizer, 0, 16, False)


def test_the_shipped_reward_function_imports_from_the_repository_root(monkeypatch):
    from tunesmith.stages.rewards import user_function

    monkeypatch.chdir(REPO)
    score = user_function("examples.rl.rewards:date_digits")
    assert score(["p", "p"], ["2025-10-06", "2025-10-07 is it"], ["2025-10-06"] * 2, [4, 6]) == [1.0, 0.9]


def test_every_reward_kind_is_registered():
    import typing

    from tunesmith.config.rewards import RewardSection
    from tunesmith.stages.rewards import REWARDS

    union = typing.get_args(RewardSection)[0]
    kinds = sorted(typing.get_args(cls.model_fields["kind"].annotation)[0] for cls in typing.get_args(union))
    assert REWARDS.names() == kinds
    with pytest.raises(TunesmithError, match="unknown reward kind 'lenght'. Did you mean 'length'"):
        REWARDS.get("lenght")

