"""The method contract, the same checks for every fine-tuning method.

Most checks run on a tiny random Llama (seeded, no assets needed) whose sizes make the parameter
formulas easy to read: vocab V=128, hidden H=32, feed-forward I=64, L=2 blocks, 4 query heads and
2 key/value heads of width 8 (so keys and values have KV=16 features). Checks that need a tokenizer
or a whole run (generation through ``tunesmith.inference.generate``, train -> resume) use the session's
``tiny_llama`` (stories260k's shapes, random weights, a tokenizer of its own).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import StartedAt

from tunesmith.config import TrainSection
from tunesmith.config.loader import validate_method, validate_recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.inference.generate import load_trained
from tunesmith.methods import NotMergeable, build_method, count_parameters
from tunesmith.training.loss import loss_sum
from tunesmith.training.schedule import add_param_groups, build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]
V, H, I, L, KV = 128, 32, 64, 2, 16
BLOCK = 2 * H * H + 2 * H * KV + 3 * H * I + 2 * H  # q, o; k, v; gate, up, down; two norms
LINEARS = [(H, H), (H, KV), (H, KV), (H, H), (H, I), (H, I), (I, H)]  # (in, out): q k v o gate up down


@dataclass(frozen=True)
class Case:
    """One method under test: its recipe section, the trainable-parameter formula and its properties."""

    method: dict
    trainable: int
    marker: Callable[[str], bool]
    identity_at_init: bool = False
    mergeable: bool = False
    peft: bool = False
    extra: dict = field(default_factory=dict)


def _lora_count(r: int, dora: bool = False) -> int:
    per_block = sum(r * (i + o) + (o if dora else 0) for i, o in LINEARS)
    return L * per_block


CASES = {
    "full": Case({"kind": "full"}, 2 * V * H + L * BLOCK + H, lambda n: True, identity_at_init=True, mergeable=True),
    "partial": Case({"kind": "partial", "blocks": 1, "modules": ["model.norm"]}, BLOCK + H,
                    lambda n: n.startswith("model.layers.1.") or n == "model.norm.weight",
                    identity_at_init=True, mergeable=True),
    "lora": Case({"kind": "lora", "r": 4}, _lora_count(4), lambda n: "lora_A" in n or "lora_B" in n,
                 identity_at_init=True, mergeable=True, peft=True),
    "lora-dora": Case({"kind": "lora", "r": 4, "dora": True}, _lora_count(4, dora=True),
                      lambda n: "lora_" in n, identity_at_init=True, mergeable=True, peft=True),
    "lora-rslora": Case({"kind": "lora", "r": 4, "rslora": True}, _lora_count(4), lambda n: "lora_" in n,
                        identity_at_init=True, mergeable=True, peft=True),
    "ia3": Case({"kind": "ia3"}, L * (2 * KV + I), lambda n: "ia3_l" in n, identity_at_init=True, mergeable=True,
                peft=True),
    "adapter-houlsby": Case({"kind": "adapter", "bottleneck": 8}, L * 2 * (2 * H * 8 + 8 + H),
                            lambda n: "bottleneck_adapters" in n, identity_at_init=True),
    "adapter-pfeiffer": Case({"kind": "adapter", "bottleneck": 8, "placement": "pfeiffer"}, L * (2 * H * 8 + 8 + H),
                             lambda n: "bottleneck_adapters.feed_forward" in n, identity_at_init=True),
    "prefix": Case({"kind": "prefix", "virtual_tokens": 4}, 4 * L * 2 * KV, lambda n: "prompt_encoder" in n, peft=True),
    "prompt": Case({"kind": "prompt", "virtual_tokens": 4}, 4 * H, lambda n: "prompt_encoder" in n, peft=True),
    "ptuning": Case({"kind": "ptuning", "virtual_tokens": 4, "encoder_hidden": 16},
                    4 * H + (H * 16 + 16) + (16 * 16 + 16) + (16 * H + H), lambda n: "prompt_encoder" in n, peft=True),
}
IDS = list(CASES)
INPUT_IDS = torch.tensor([[1, 5, 6, 7, 8, 9], [3, 4, 5, 10, 11, 12]])


def tiny_llama() -> torch.nn.Module:
    """The same tiny random Llama every call (seeded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def applied(case_id: str):
    """(method, model with the method applied) for a case."""
    method = build_method(validate_method(CASES[case_id].method))
    return method, method.apply(tiny_llama()).eval()


def perturb_trainable(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every trainable parameter away from its initial value (seeded), as training would."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def logits(model: torch.nn.Module, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


def saved(case_id: str, folder: Path):
    """A perturbed model of the case, saved to ``folder`` the way a run saves it."""
    method, model = applied(case_id)
    perturb_trainable(model)
    method.save(model, folder)
    method.write_manifest(folder, base_model="tiny", template="chatml")
    return method, model


def greedy_by_forward(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding one forward pass at a time: the reference ``generate`` must reproduce."""
    for _ in range(new_tokens):
        next_token = logits(model, input_ids)[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids[0, -new_tokens:].tolist()


@pytest.mark.parametrize("case_id", IDS)
def test_only_intended_parameters_train_and_count_matches_formula(case_id: str) -> None:
    _, model = applied(case_id)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(CASES[case_id].marker(name) for name in trainable), trainable
    assert count_parameters(model)[0] == CASES[case_id].trainable


@pytest.mark.parametrize("case_id", [c for c in IDS if CASES[c].identity_at_init])
def test_identity_methods_leave_logits_unchanged_at_init(case_id: str) -> None:
    _, model = applied(case_id)
    torch.testing.assert_close(logits(model), logits(tiny_llama()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case_id", [c for c in IDS if not CASES[c].identity_at_init])
def test_virtual_token_methods_change_logits_at_init(case_id: str) -> None:
    _, model = applied(case_id)
    assert not torch.allclose(logits(model), logits(tiny_llama()), atol=1e-4)
    assert logits(model).shape == (2, INPUT_IDS.shape[1], V)  # one row per real token, virtual ones trimmed


@pytest.mark.parametrize("case_id", IDS)
def test_one_optimizer_step_changes_only_trainable_parameters(case_id: str) -> None:
    method, model = applied(case_id)
    model.train()
    section = TrainSection(lr=1e-2)
    optimizer = build_optimizer(model, section, method.param_groups(model, section))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = {"input_ids": INPUT_IDS, "attention_mask": torch.ones_like(INPUT_IDS), "labels": INPUT_IDS}
    loss_sum(model, batch).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, sorted(changed - trainable)


@pytest.mark.parametrize("case_id", IDS)
def test_save_then_load_gives_identical_logits_and_generation_works(case_id: str, tmp_path: Path) -> None:
    _, model = saved(case_id, tmp_path)
    reloaded = load_trained(tiny_llama(), tmp_path).eval()
    assert not torch.allclose(logits(model), logits(tiny_llama()), atol=1e-4)  # the saved state is not trivial
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)
    # generate == greedy decoding by forward passes, one sequence at a time and batched with left padding
    short = INPUT_IDS[1:, 2:]  # (1, 4)
    expected = [greedy_by_forward(reloaded, INPUT_IDS[:1], 5), greedy_by_forward(reloaded, short, 5)]
    one_by_one = [reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                    do_sample=False)[0, -5:].tolist() for ids in (INPUT_IDS[:1], short)]
    assert one_by_one == expected
    left_padded = INPUT_IDS.clone()
    left_padded[1, :2] = 0
    mask = torch.ones_like(left_padded)
    mask[1, :2] = 0
    batched = reloaded.generate(input_ids=left_padded, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert batched[:, -5:].tolist() == expected


@pytest.mark.parametrize("case_id", [c for c in IDS if CASES[c].mergeable])
def test_merged_equals_unmerged_and_merging_twice_changes_nothing(case_id: str, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    method, _ = saved(case_id, tmp_path)
    model = load_trained(tiny_llama(), tmp_path).eval()
    unmerged = logits(model)
    merged = method.merge(model)
    assert type(merged) is LlamaForCausalLM
    torch.testing.assert_close(logits(merged), unmerged, rtol=0, atol=1e-4)
    state = {name: p.clone() for name, p in merged.state_dict().items()}
    again = method.merge(merged)
    assert all(torch.equal(p, state[name]) for name, p in again.state_dict().items())


@pytest.mark.parametrize("case_id", [c for c in IDS if not CASES[c].mergeable])
def test_unmergeable_methods_say_why_in_one_sentence(case_id: str) -> None:
    method, model = applied(case_id)
    with pytest.raises(NotMergeable) as raised:
        method.merge(model)
    message = str(raised.value)
    assert len(message) > 40 and "." not in message.rstrip(".")


@pytest.mark.parametrize("case_id", [c for c in IDS if CASES[c].peft])
def test_saved_folder_loads_with_plain_peft(case_id: str, tmp_path: Path) -> None:
    from peft import PeftModel

    _, model = saved(case_id, tmp_path)
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits
    torch.testing.assert_close(plain_logits[:, -INPUT_IDS.shape[1]:], logits(model), rtol=0, atol=1e-6)


def test_loraplus_gives_b_matrices_their_own_learning_rate() -> None:
    method = build_method(validate_method({"kind": "lora", "r": 4, "loraplus_lr_ratio": 16}))
    model = method.apply(tiny_llama())
    section = TrainSection(lr=1e-3)
    groups = method.param_groups(model, section)
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    fast = [g for g in groups if g.get("lr") == pytest.approx(1.6e-2)]
    assert {id(p) for g in fast for p in g["params"]} == b_ids
    assert sum(p.numel() for g in groups for p in g["params"]) == CASES["lora"].trainable


def test_gradual_unfreezing_schedule_walks_down_from_the_top() -> None:
    method = build_method(validate_method({"kind": "partial", "blocks": 1, "unfreeze_every": 2}))
    model = method.apply(tiny_llama())
    method.bind_training(steps_per_epoch=10, total_steps=10)
    assert method.summary() == "gradual unfreezing: block 0 at step 2"
    assert [len(method.newly_trainable(model, step)) for step in range(5)] == [0, 0, 9, 0, 0]
    assert count_parameters(model)[0] == 2 * BLOCK
    epochs = build_method(validate_method({"kind": "partial", "blocks": 1, "unfreeze_every": 1,
                                           "unfreeze_unit": "epochs"}))
    epochs.apply(tiny_llama())
    epochs.bind_training(steps_per_epoch=3, total_steps=9)
    assert epochs.summary() == "gradual unfreezing: block 0 at step 3"


def test_parameters_added_later_follow_the_learning_rate_schedule() -> None:
    first, later = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    section = TrainSection(lr=1.0, schedule="linear")
    optimizer = build_optimizer(torch.nn.Linear(1, 1), section, [{"params": [first], "weight_decay": 0.0}])
    scheduler = build_scheduler(optimizer, section, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    add_param_groups(optimizer, scheduler, [{"params": [later], "weight_decay": 0.0}])
    assert optimizer.param_groups[1]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"]) == pytest.approx(0.6)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.5])


# Bad input: one sentence naming the field and the fix.

def test_target_that_matches_nothing_lists_closest_module_names() -> None:
    method = build_method(validate_method({"kind": "lora", "targets": ["q_prj"]}))
    with pytest.raises(TunesmithError, match=r"method.targets: no module named 'q_prj'.*q_proj"):
        method.apply(tiny_llama())


@pytest.mark.parametrize("settings, message", [
    ({"kind": "adapter", "bottleneck": 32}, "between 1 and the hidden size"),
    ({"kind": "adapter", "reduction_factor": 64}, "adapter width of 0"),
    ({"kind": "adapter", "feed_forward_module": "ffn"}, "has no sub-module 'ffn'; it has self_attn, mlp"),
    ({"kind": "prompt", "virtual_tokens": 64}, "use fewer virtual tokens"),
    ({"kind": "ia3", "targets": ["k_proj"], "feed_forward": ["down_proj"]}, "also in method.targets"),
])
def test_sizes_and_names_are_validated(settings: dict, message: str) -> None:
    with pytest.raises(TunesmithError, match=message):
        build_method(validate_method(settings)).apply(tiny_llama())


def test_prefix_needs_a_model_with_a_key_value_cache() -> None:
    from tunesmith.methods.virtual_tokens import check_fits

    class NoCache(torch.nn.Module):
        config = type("Config", (), {"max_position_embeddings": 128})()

        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TunesmithError, match="method 'prefix' needs a model whose forward takes"):
        check_fits(NoCache(), "prefix", 4)


# On the tiny Llama of conftest: a tokenizer, the inference functions and whole runs.

def test_prompt_text_init_and_inference_functions(tiny_llama: str) -> None:
    from tunesmith.inference.generate import generate, load_for_inference, stream_reply

    text = "Once upon a time"
    method = build_method(validate_method({"kind": "prompt", "virtual_tokens": 6, "init_text": text}))
    model, tokenizer = load_for_inference(tiny_llama)
    model = method.apply(model).eval()
    token_ids = tokenizer(text)["input_ids"]  # as peft tokenises it: with the BOS token
    expected = model.get_input_embeddings().weight[(token_ids * 6)[:6]]
    torch.testing.assert_close(model.prompt_encoder.default.embedding.weight, expected)
    conversation = [{"role": "user", "content": "Tell me a story."}]
    replies = generate(model, tokenizer, [conversation, [{"role": "user", "content": "Hi"}]], max_new_tokens=8)
    assert replies[0] == "".join(stream_reply(model, tokenizer, conversation, max_new_tokens=8)).strip()
    assert replies[0]


def _recipe(tiny_llama: str, method: dict, out: Path):
    data = REPO / "examples" / "data" / "tiny"
    return validate_recipe({
        "model": {"name": tiny_llama},
        "data": {"train": str(data / "train.jsonl"), "max_length": 64},
        "method": method,
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2, "keep_checkpoints": 2,
                  "device": "cpu", "log_every": 100},
        "output": {"dir": str(out)},
    })


@pytest.mark.parametrize("method", [
    {"kind": "partial", "blocks": 1, "unfreeze_every": 1},
    {"kind": "lora", "r": 4, "loraplus_lr_ratio": 16},
    {"kind": "adapter", "bottleneck": 8},
    {"kind": "prefix", "virtual_tokens": 4},
], ids=["partial-unfreezing", "loraplus", "adapter", "prefix"])
def test_resume_from_a_checkpoint_equals_training_straight_through(method: dict, tiny_llama: str,
                                                                 tmp_path: Path) -> None:
    from tunesmith.pipeline.finetune import finetune

    straight = tmp_path / "straight"
    finetune(_recipe(tiny_llama, method, straight), progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    for name in ("adapter", "model", "summary.json", "metrics.jsonl"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    started = StartedAt()
    finetune(_recipe(tiny_llama, method, resumed), resume=True, extra_hooks=[started], progress=False)
    assert started.step == 2  # really resumed at the checkpoint, not restarted from step 0
    expected = load_file(straight / "checkpoints" / "step-00000004" / "trainable.safetensors")
    got = load_file(resumed / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_gradual_unfreezing_under_ddp_equals_one_process(tiny_llama: str, tmp_path: Path) -> None:
    """Two gloo processes with batch 2 each = one process with batch 4, while blocks unfreeze.

    DistributedDataParallel only synchronises the parameters that required gradients when it was
    built; the trainer rebuilds it at each unfreezing step, else the processes would drift apart.
    """
    import subprocess
    import sys

    import yaml

    method = {"kind": "partial", "blocks": 1, "unfreeze_every": 1}
    for name, batch in (("single", 4), ("ddp", 2)):
        raw = _recipe(tiny_llama, method, tmp_path / name).model_dump(mode="json")
        raw["train"].update(batch_size=batch, checkpoint_every=None)
        raw["train"]["speed"]["autocast"] = "off"  # float32: the tolerance below was set there
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "src")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
              "-m", "tunesmith", "train", str(tmp_path / "ddp.yaml")]
    for command in ([sys.executable, "-m", "tunesmith", "train", str(tmp_path / "single.yaml")], launch):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    single = load_file(tmp_path / "single" / "model" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    # Adam divides by sqrt(v): float summation order moves a near-zero gradient's update by ~1e-4;
    # a block whose gradients were not synchronised moves by ~1e-2 (measured when building it).
    difference = max(float((ddp[name] - single[name]).abs().max()) for name in single)
    assert difference < 2e-3
