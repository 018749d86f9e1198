"""EWC maths, L2-SP, NEFTune, dropout, data mixing and the forgetting report, on tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tunesmith.config import validate_recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import EncodedExample
from tunesmith.data.mixing import SourceSlice, mixture_weights, resolve_sources
from tunesmith.forgetting.ewc import diagonal_fisher, normalise_fisher
from tunesmith.forgetting.regularisers import AnchorPenalty, add_neftune_noise, set_model_dropout
from tunesmith.forgetting.retain import forgetting_report
from tunesmith.training.sampler import MixtureSampler


class TinyLM(nn.Module):
    """Embedding -> tanh -> linear head: small enough for an independent per-example gradient."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):  # as a transformers causal LM takes it
        return SimpleNamespace(logits=self.head(torch.tanh(self.hidden(self.embed(input_ids)))))


def tiny_examples(count: int = 7, length: int = 5, vocab: int = 11) -> list[EncodedExample]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (count, length), generator=generator).tolist()
    # Mask the second token of every other example, so per-example target counts differ.
    return [EncodedExample(tuple(r), tuple(-100 if (i % 2 and j == 1) else t for j, t in enumerate(r)))
            for i, r in enumerate(rows)]


def test_fisher_equals_per_example_gradients_from_torch_func():
    torch.manual_seed(0)
    model = TinyLM()
    model.hidden.bias.requires_grad_(False)  # frozen parameters get no Fisher
    examples = tiny_examples()
    fisher, used = diagonal_fisher(model, examples, pad_token_id=0)
    assert used == len(examples) and "hidden.bias" not in fisher

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def example_loss(params, input_ids, labels):
        logits = torch.func.functional_call(model, {**params, **frozen}, (input_ids[None],)).logits[0]
        return nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)  # mean over targets

    ids = torch.tensor([e.input_ids for e in examples])
    labels = torch.tensor([e.labels for e in examples])
    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(trainable, ids, labels)
    for name, gradients in per_example.items():
        torch.testing.assert_close(fisher[name], gradients.pow(2).mean(0), rtol=1e-5, atol=1e-9)


def test_fisher_stops_at_the_time_limit_with_at_least_one_example():
    _, used = diagonal_fisher(TinyLM(), tiny_examples(), pad_token_id=0, max_seconds=0.0)
    assert used == 1


def test_normalised_fisher_has_mean_one():
    fisher = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.0, 4.0]])}
    normalised = normalise_fisher(fisher)
    assert float(torch.cat([v.flatten() for v in normalised.values()]).mean()) == pytest.approx(1.0)
    torch.testing.assert_close(normalised["a"], torch.tensor([0.5, 1.5]))


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_2_lambda_f_delta():
    torch.manual_seed(0)
    model = TinyLM()
    model.embed.requires_grad_(False)
    importance = {n: torch.rand_like(p) for n, p in model.named_parameters() if p.requires_grad}
    penalty = AnchorPenalty(model, strength=0.7, importance=importance, name="ewc")
    assert float(penalty(model).detach()) == 0.0
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    value = penalty(model)
    value.backward()
    expected = sum(float((importance[n] * (p.detach() - anchors[n]) ** 2).sum()) for n, p in model.named_parameters()
                   if n in importance)
    assert float(value.detach()) == pytest.approx(0.7 * expected, rel=1e-5)
    for name, parameter in model.named_parameters():
        if name in importance:
            torch.testing.assert_close(parameter.grad, 2 * 0.7 * importance[name] * (parameter.detach() - anchors[name]))
        else:
            assert parameter.grad is None


def test_l2sp_is_ewc_with_unit_importance_and_a_mismatched_fisher_is_refused():
    model = TinyLM()
    l2sp = AnchorPenalty(model, strength=0.5)
    ones = AnchorPenalty(model, strength=0.5, importance={n: torch.ones_like(p) for n, p in model.named_parameters()})
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert float(l2sp(model)) == pytest.approx(float(ones(model))) == pytest.approx(0.5 * model.head.weight.numel())
    with pytest.raises(TunesmithError, match="importance does not match"):
        AnchorPenalty(model, 1.0, importance={"head.weight": torch.ones(11, 6)}, name="ewc")


def test_neftune_noise_only_in_training_and_bounded_by_alpha_over_sqrt_length_times_width():
    model = TinyLM()
    ids = torch.randint(0, 11, (3, 4))
    clean = model.embed(ids)
    handle = add_neftune_noise(model, alpha=5.0)
    model.eval()
    torch.testing.assert_close(model.embed(ids), clean)
    model.train()
    noise = model.embed(ids) - clean
    bound = 5.0 / (4 * 6) ** 0.5
    assert 0 < float(noise.abs().max()) <= bound and float(noise.abs().mean()) > bound / 4
    handle.remove()
    torch.testing.assert_close(model.embed(ids), clean)


def test_dropout_is_set_on_llama_attention_and_missing_hidden_dropout_is_named(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert set_model_dropout(model, attention=0.2, hidden=None) == ["attention dropout 0.2 in 5 attention modules"]
    assert {m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")} == {0.2}
    with pytest.raises(TunesmithError, match="no dropout layers"):
        set_model_dropout(model, attention=None, hidden=0.1)


def test_sampling_weights_give_the_requested_mixture():
    slices = [SourceSlice("task", 0, 100, 0.6), SourceSlice("replay", 100, 50, 0.3), SourceSlice("other", 150, 10, 0.1)]
    sampler = MixtureSampler(slices, batch_size=8, grad_accum=2, seed=3)
    seen = torch.zeros(3)
    for step in range(400):
        for index in (i for batch in sampler.micro_batches(step) for i in batch):
            seen[next(k for k, s in enumerate(slices) if s.start <= index < s.start + s.count)] += 1
    shares = seen / seen.sum()
    torch.testing.assert_close(shares, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)
    logged = sampler.describe(400)
    assert logged == pytest.approx({"mix_task": float(shares[0]), "mix_replay": float(shares[1]),
                                    "mix_other": float(shares[2])}, abs=1e-4)


def test_mixture_sampler_is_a_function_of_seed_and_step_and_splits_ranks():
    slices = [SourceSlice("a", 0, 30, 0.5), SourceSlice("b", 30, 7, 0.5)]
    uninterrupted = MixtureSampler(slices, 4, 1, world_size=2, rank=0, seed=1)
    batches = [uninterrupted.micro_batches(step) for step in range(20)]
    resumed = MixtureSampler(slices, 4, 1, world_size=2, rank=0, seed=1)
    assert resumed.micro_batches(17) == batches[17]
    other_rank = MixtureSampler(slices, 4, 1, world_size=2, rank=1, seed=1)
    assert batches[5][0] + other_rank.micro_batches(5)[0] == uninterrupted.global_batch_indices(5)
    # Within a source, draws go through a permutation: the first 7 draws of 'b' are all of its examples.
    drawn_b = [i for step in range(40) for i in uninterrupted.global_batch_indices(step) if i >= 30][:7]
    assert sorted(drawn_b) == list(range(30, 37))


def test_temperature_weights_and_implicit_train_source():
    assert mixture_weights([100, 25], [None, None], temperature=2.0) == pytest.approx([2 / 3, 1 / 3])
    assert mixture_weights([100, 25], [None, None], temperature=1.0) == pytest.approx([0.8, 0.2])
    data = validate_recipe({"data": {"train": "task.jsonl", "validation_fraction": 0.1,
                                     "sources": [{"name": "replay", "train": "general.txt", "weight": 0.25}]}}).data
    sources = resolve_sources(data)
    assert [(s.name, s.weight, s.validation_fraction) for s in sources] == [("train", 0.75, 0.1), ("replay", 0.25, 0.0)]


@pytest.mark.parametrize("sources, message", [
    ([{"name": "replay", "train": "g.txt", "weight": 1.0}], "leaving nothing for data.train"),
    ([{"name": "a", "train": "g.txt", "weight": 0.2}, {"name": "b", "train": "h.txt"}], "every source or to none"),
    ([{"name": "train", "train": "g.txt"}], "used twice"),
])
def test_source_mistakes_are_named(sources, message):
    data = validate_recipe({"data": {"train": "task.jsonl", "sources": sources}}).data
    with pytest.raises(TunesmithError, match=message):
        resolve_sources(data)


def test_forgetting_report_compares_before_and_after():
    before = {"text": {"metric": "perplexity", "score": 4.0, "lower_is_better": True, "loss": 1.3863},
              "choice": {"metric": "accuracy", "score": 0.5, "lower_is_better": False}}
    after = {"text": {"metric": "perplexity", "score": 8.0, "lower_is_better": True, "loss": 2.0794},
             "choice": {"metric": "accuracy", "score": 0.25, "lower_is_better": False}}
    report = forgetting_report(before, after, task_before=3.0, task_after=1.0)
    assert report["forgetting"] == pytest.approx(0.6931) and report["task_gain"] == 2.0
    assert report["forgetting_per_gain"] == pytest.approx(0.34655)
    assert report["retained"]["choice"] == {"metric": "accuracy", "before": 0.5, "after": 0.25, "change": -0.25}
    without_text = forgetting_report({"choice": before["choice"]}, {"choice": after["choice"]}, None, None)
    assert without_text["forgetting"] == 0.25 and "task_gain" not in without_text
    assert "general_text_loss_rise" not in report  # measured by an older tunesmith: no general-text entry
    general = {"metric": "loss", "lower_is_better": True, "extra": True}
    with_general = forgetting_report({**before, "general_text_loss": {**general, "score": 2.5, "loss": 2.5}},
                                     {**after, "general_text_loss": {**general, "score": 2.75, "loss": 2.75}}, 3.0, 1.0)
    assert with_general["general_text_loss_rise"] == pytest.approx(0.25)
    assert set(with_general["retained"]) == {"text", "choice"} and with_general["forgetting"] == pytest.approx(0.6931)


def test_galore_optimizer_projects_block_weights(tiny_llama):
    pytest.importorskip("galore_torch")
    from transformers import AutoModelForCausalLM

    from tunesmith.training.schedule import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    section = validate_recipe({"data": {"train": "x.jsonl"},
                               "train": {"optimizer": "galore_adamw", "galore": {"rank": 4}}}).train
    optimizer = build_optimizer(model, section)
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and len(projected[0]["params"]) == 5 * 7  # q, k, v, o, gate, up, down per block
    ids = torch.randint(0, 512, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q_weight]["exp_avg"].shape[0] == 4 or optimizer.state[q_weight]["exp_avg"].shape[1] == 4


def test_every_forgetting_example_recipe_is_valid():
    from tests.conftest import REPO

    from tunesmith.config import load_recipe

    recipes = sorted((REPO / "examples" / "forgetting").rglob("*.yaml"))
    assert len(recipes) == 6
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.retain is not None and path.read_text().startswith(f"# tunesmith train examples/forgetting/{path.name}")
        assert recipe.model.name == "smollm2-135m-instruct", f"{path}: a user's example needs no test assets"


def test_the_stories260k_comparison_recipes_are_valid():
    """The recipes behind the stories260k table in docs/forgetting.md (they need the test assets)."""
    from tests.conftest import REPO

    from tunesmith.config import load_recipe

    recipes = sorted((REPO / "tests" / "recipes" / "forgetting_stories260k").glob("*.yaml"))
    assert [p.stem for p in recipes] == ["ewc", "full", "l2sp_neftune", "lora", "replay"]
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.model.name == "../shared/assets/models/stories260k" and recipe.retain is not None
        assert path.read_text().startswith(f"# tunesmith train tests/recipes/forgetting_stories260k/{path.name}")


def test_fisher_of_a_lora_adapter_on_the_models_own_generations(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import LoraMethod
    from tunesmith.forgetting.reference import sample_from_model
    from tunesmith.methods import build_method

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = build_method(LoraMethod(r=2, dropout=0.0)).apply(AutoModelForCausalLM.from_pretrained(tiny_llama))
    state = torch.get_rng_state()
    samples = sample_from_model(model, tokenizer, count=3, max_length=20, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # sampling leaves the run's random stream alone
    assert samples == sample_from_model(model, tokenizer, count=3, max_length=20, seed=0)
    for sample in samples:
        assert sample.input_ids[0] == tokenizer.bos_token_id and sample.labels == sample.input_ids
        assert len(sample.input_ids) <= 20 and tokenizer.eos_token_id not in sample.input_ids[1:-1]
    fisher, used = diagonal_fisher(model, samples, tokenizer.pad_token_id)
    assert used == 3 and fisher and all("lora_" in name for name in fisher)
    # At initialisation B = 0, so A gets no gradient and only B has Fisher information.
    assert all(float(v.abs().sum()) == 0 for n, v in fisher.items() if "lora_A" in n)
    assert all(float(v.sum()) > 0 for n, v in fisher.items() if "lora_B" in n)
