"""The family matrix: every major open family trains, packs, generates with its own chat template and exports.

Tiny random models built from each family's own config class (``tests/family_support.py``), so the
matrix runs on a fresh clone with no download. docs/families.md records the matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from family_support import FAMILIES, build_family
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.training.batching import collate
from tunesmith.training.chunked_loss import model_inputs, plain_loss_sum
from tunesmith.training.packing import VARLEN_ATTENTION, enable_packed_attention, pack_collate

NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Each family's folder, built on first use and kept for the module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def trained_runs(family_models, tmp_path_factory, tiny_data_module):
    """Each family's LoRA run (2 steps on the tiny instruction data, packed where the family can), on first use."""
    from tunesmith.config import validate_recipe
    from tunesmith.pipeline.finetune import finetune

    runs: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"run-{name}") / "run"
            recipe = validate_recipe({
                "model": {"name": str(family_models(name))},
                "data": {"train": tiny_data_module, "max_length": 160, "template": "auto"},
                "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1, "seed": 0,
                          "speed": {"autocast": "off"}},
                "output": {"dir": str(out)},
            })
            runs[name] = (out, finetune(recipe))
        return runs[name]

    return get


@pytest.fixture(scope="module")
def tiny_data_module() -> str:
    from conftest import TINY_DATA

    return str(TINY_DATA)


def make_examples(count: int, seed: int = 0) -> list[EncodedExample]:
    """Examples of 6 to 28 tokens (longer than the families' 8-token sliding windows), prompts masked."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 6 + (index * 7) % 23
        ids = torch.randint(30, 500, (length,), generator=generator).tolist()
        prompt = 1 + index % 4
        examples.append(EncodedExample(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:])))
    return examples


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int]) -> list[float]:
    return [float(F.cross_entropy(logits[0, start:end - 1].float(), labels[0, start + 1:end],
                                  ignore_index=IGNORE_INDEX, reduction="sum"))
            for start, end in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("name", NAMES)
def test_packed_per_example_losses_equal_unpacked(name: str, family_models) -> None:
    """Packing never lets an example see another: mind sliding windows (Mistral, Gemma), soft-capping (Gemma 2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_models(name)).train()
    examples = make_examples(5)
    with torch.no_grad():
        unpacked = [float(plain_loss_sum(model, collate([example], 0))) for example in examples]
    if model.config._attn_implementation == "eager":  # Gemma 2: sdpa cannot soft-cap attention logits
        assert FAMILIES[name].config.get("attn_logit_softcapping")
        assert not enable_packed_attention(model)  # so it keeps padded batches
        return
    assert enable_packed_attention(model)
    assert model.config._attn_implementation == VARLEN_ATTENTION
    packed = pack_collate(examples, 0)
    with torch.no_grad():
        logits = model(**model_inputs(packed), use_cache=False).logits
    losses = per_example_losses(logits, packed["labels"], packed["cu_seq_lens_q"].tolist())
    assert losses == pytest.approx(unpacked, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_each_family_trains_lora_and_generates_with_its_own_template(name: str, family_models, trained_runs) -> None:
    from tunesmith.data.encode import render_prompt
    from tunesmith.inference.generate import generate, load_for_inference

    out, summary = trained_runs(name)
    model, tokenizer = load_for_inference(str(family_models(name)), adapter=str(out))
    template = (Path(__file__).parent / "data" / "templates" / f"{FAMILIES[name].template}.jinja").read_text()
    assert tokenizer.chat_template == template  # the family's own template, kept with the result
    conversation = [{"role": "user", "content": "Name a colour."}]
    prompt = render_prompt(tokenizer, conversation)
    assert "Name a colour." in prompt
    replies = generate(model, tokenizer, [conversation], max_new_tokens=8)
    assert len(replies) == 1 and isinstance(replies[0], str)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_on_a_mixture_of_experts_adapts_attention_and_every_expert(family_models, tmp_path: Path) -> None:
    """Qwen3-MoE: all-linear LoRA covers attention, the router and the stacked expert weights (default dropout)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.config.loader import validate_method
    from tunesmith.methods import build_method

    folder = family_models("qwen3_moe")
    method = build_method(validate_method({"kind": "lora", "r": 4}))  # dropout 0.05: on the linear layers only
    model = method.apply(AutoModelForCausalLM.from_pretrained(folder).eval())
    dropouts = {type(d).__name__ for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()}
    assert dropouts == {"Dropout", "Identity"}  # linear layers drop out; peft's ParamWrapper takes none
    model.eval()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name for name in trainable)
    assert any(".experts." in name for name in trainable)  # the experts' gate_up_proj and down_proj
    assert any("self_attn.q_proj" in name for name in trainable)
    assert any(".mlp.gate." in name for name in trainable)  # the router, as peft's all-linear adapts it
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])
    base = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids)
    torch.testing.assert_close(_logits(model, ids), base)  # LoRA starts as the identity
    with torch.no_grad():  # a trained-looking update: B no longer zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3  # the experts' and attention's updates change the output
    method.save(model, tmp_path / "adapter")
    reloaded = method.load(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, ids), adapted)
    merged = method.merge(reloaded)
    assert type(merged).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(_logits(merged, ids), adapted, rtol=0, atol=1e-4)


METHOD_MATRIX = {  # a few families through the method contract: identity at init, save -> load, merge
    "dora": {"kind": "lora", "r": 4, "dora": True, "dropout": 0.0},
    "ia3": {"kind": "ia3"},
    "full": {"kind": "full"},
}


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("method_id", list(METHOD_MATRIX))
def test_method_contract_on_other_families(name: str, method_id: str, family_models, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.config.loader import validate_method
    from tunesmith.methods import build_method

    folder = family_models(name)
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    base = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids)
    settings = METHOD_MATRIX[method_id]
    if method_id == "ia3" and name == "phi3":  # peft knows no IA3 default for Phi-3's fused qkv_proj/gate_up_proj
        settings = {**settings, "targets": ["qkv_proj", "down_proj"], "feed_forward": ["down_proj"]}
    method = build_method(validate_method(settings))
    model = method.apply(AutoModelForCausalLM.from_pretrained(folder).eval())
    torch.testing.assert_close(_logits(model, ids), base)  # every one of these starts as the identity
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    trained = _logits(model, ids)
    assert (trained - base).abs().max() > 1e-4
    method.save(model, tmp_path / method.artifact)
    reloaded = method.load(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / method.artifact).eval()
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(method.merge(reloaded), ids), trained, rtol=0, atol=1e-4)


@pytest.mark.slow  # two exports, each reloaded and probed with greedy replies
@pytest.mark.parametrize("name", NAMES)
def test_each_family_exports_to_hf_and_peft(name: str, trained_runs, tmp_path: Path) -> None:
    from tunesmith.export import export

    out, _ = trained_runs(name)
    for fmt in ("hf", "peft"):
        report = export(out, tmp_path / fmt, fmt)
        assert all(check.passed for check in report.checks.values()) and report.checks


def skip_without_llama_cpp() -> None:
    from tunesmith.export.convert import converter_unavailable
    from tunesmith.export.llama_cpp import llama_cpp_unavailable

    for reason in (converter_unavailable(), llama_cpp_unavailable()):
        if reason:
            pytest.skip(reason)


NO_WINDOW_IN_LLAMA_CPP = ("llama.cpp converts Mistral to its 'llama' architecture, which has no sliding window: the tiny "
                          "model's 8-token window (as Mistral v0.1's 4096) is not applied there (KL 0.22 nats), even with "
                          "the window written as metadata; Mistral v0.2/v0.3 have none (the test below)")
GGUF_FAMILIES = [pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=Exception, reason=NO_WINDOW_IN_LLAMA_CPP))
                 if name == "mistral" else name for name in NAMES]


@pytest.mark.slow  # llama.cpp's converter starts a Python with torch and transformers per file; node runs llama.cpp
@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_each_family_exports_to_gguf_checked_by_llama_cpp(name: str, trained_runs, tmp_path: Path) -> None:
    """Every family's f16 GGUF, run by llama.cpp, agrees with transformers (export/check.py's f16 tolerance)."""
    from tunesmith.export import export

    skip_without_llama_cpp()
    out, _ = trained_runs(name)
    report = export(out, tmp_path / "gguf", "gguf", quantize="f16")
    check = report.checks["llama.cpp"]
    assert check.passed and check.tokenizer_matches  # llama.cpp tokenises the probe prompts as transformers does
    if FAMILIES[name].config_class == "Gemma3TextConfig":  # llama.cpp assumes 5 sliding layers to 1 full unless told
        from gguf import GGUFReader

        field = GGUFReader(tmp_path / "gguf" / "model-f16.gguf").fields["gemma3.attention.sliding_window_pattern"]
        assert [bool(field.parts[index][0]) for index in field.data] == [True, False]  # the tiny config's layer_types


@pytest.mark.slow  # one conversion and one llama.cpp run of an untrained model
def test_mistral_without_a_sliding_window_exports_to_gguf_checked_by_llama_cpp(tmp_path: Path) -> None:
    """Mistral v0.2/v0.3's shape (sliding_window: null): llama.cpp's 'llama' architecture runs it as transformers."""
    import dataclasses

    from tunesmith.export import export

    skip_without_llama_cpp()
    family = dataclasses.replace(FAMILIES["mistral"], config={**FAMILIES["mistral"].config, "sliding_window": None})
    folder = build_family("mistral", tmp_path / "model", family=family)
    report = export(folder, tmp_path / "gguf", "gguf", quantize="f16")
    assert report.checks["llama.cpp"].passed and report.checks["llama.cpp"].tokenizer_matches


def test_gguf_of_a_converted_family_refuses_q4_0_by_name(trained_runs, tmp_path: Path) -> None:
    from tunesmith.core.errors import TunesmithError
    from tunesmith.export import export

    out, _ = trained_runs("qwen2")
    with pytest.raises(TunesmithError, match="q4_0 is written for plain Llama only; for 'qwen2'"):
        export(out, tmp_path / "gguf", "gguf", quantize="q4_0")
    assert not (tmp_path / "gguf").exists()


def test_sft_without_traces_keeps_a_thinking_model_thinking(family_models) -> None:
    """Qwen3: a reply without <think> is trained after the template's empty block, which stays in the prompt."""
    from transformers import AutoTokenizer

    from tunesmith.data.encode import encode_example, render_prompt
    from tunesmith.data.formats import Example

    tokenizer = AutoTokenizer.from_pretrained(family_models("qwen3"))
    empty_block = tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    reply = tokenizer("Paris.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    question = {"role": "user", "content": "What is the capital of France?"}

    def trained_and_context(messages):
        encoded = encode_example(Example(messages=tuple(messages), where="test"), tokenizer, 256)
        trained = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        return encoded.input_ids, trained

    ids, trained = trained_and_context([question, {"role": "assistant", "content": "Paris."}])
    assert trained == reply  # the reply and its end: no empty reasoning block to learn
    start = len(ids) - len(reply) - len(empty_block)
    assert list(ids[start:start + len(empty_block)]) == empty_block  # the block is there, as context
    # the prompt at inference asks the model to think (no enable_thinking=False), as before training
    assert render_prompt(tokenizer, [question]).endswith("<|im_start|>assistant\n")

    ids, trained = trained_and_context([question, {"role": "assistant", "content": "<think>It is Paris.</think>Paris."}])
    assert trained == tokenizer("<think>\nIt is Paris.\n</think>\n\nParis.<|im_end|>\n",
                                add_special_tokens=False)["input_ids"]  # a real trace is learnt

    second = {"role": "user", "content": "And of Spain?"}
    ids, trained = trained_and_context([question, {"role": "assistant", "content": "Paris."}, second,
                                        {"role": "assistant", "content": "Madrid."}])
    assert trained == tokenizer("Madrid.<|im_end|>\n", add_special_tokens=False)["input_ids"]

    chatml = AutoTokenizer.from_pretrained(family_models("qwen2"))  # a template without the switch: unchanged
    encoded = encode_example(Example(messages=(question, {"role": "assistant", "content": "Paris."}), where="t"),
                             chatml, 256)
    assert [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX] == reply
