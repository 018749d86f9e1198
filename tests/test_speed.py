"""train.speed: fast paths tested against the plain ones (packing, chunked loss, bf16, grouping, end to end)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import EvalSection, FullMethod, LoraMethod, SpeedSection, TrainSection
from tunesmith.core.runtime import Runtime
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.data.encoded import EncodedData
from tunesmith.methods import build_method
from tunesmith.training.batching import collate
from tunesmith.training.chunked_loss import (
    LinearCrossEntropy,
    chunked_loss_sum,
    model_inputs,
    plain_loss_sum,
    softmax_rows,
)
from tunesmith.training.fused_mlp import _fused_forward, _fused_forward_compiled, _fused_forward_keeping_product
from tunesmith.training.hooks import Hook
from tunesmith.training.loop import LoopSeams, Trainer
from tunesmith.training.loss import count_real_tokens, count_target_tokens
from tunesmith.training.objective import TokenCrossEntropy
from tunesmith.training.packing import VARLEN_ATTENTION, enable_packed_attention, pack_collate, restore_attention
from tunesmith.training.sampler import LengthGroupedSampler, StepSampler, build_sampler
from tunesmith.training.speed import apply_speed, autocast_choice, autocast_dtype, native_bfloat16

CPU = Runtime(torch.device("cpu"))


def make_examples(count: int, vocab: int = 512, seed: int = 0) -> list[EncodedExample]:
    """Examples of varied lengths with a masked prompt, like encoded chat data."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 6 + (index * 7) % 23
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        prompt = 1 + index % 4
        examples.append(EncodedExample(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:])))
    return examples


def load_llama(path: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return model.train()


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int]) -> list[float]:
    """Summed next-token loss of each example of a packed row."""
    return [float(F.cross_entropy(logits[0, start:end - 1].float(), labels[0, start + 1:end],
                                  ignore_index=IGNORE_INDEX, reduction="sum"))
            for start, end in zip(bounds[:-1], bounds[1:])]


def plain_and_chunked(model, batch):
    """Both losses on ``batch`` and the trainable parameters' gradients of each (chunks of 7: the last partial)."""
    losses, grads = [], []
    for loss_fn in (plain_loss_sum, functools.partial(chunked_loss_sum, chunk_tokens=7)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(loss)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    return (*losses, *grads)


def test_pack_collate_layout() -> None:
    examples = [EncodedExample((5, 6, 7), (-100, 6, 7)), EncodedExample((8, 9), (8, 9))]
    batch = pack_collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # each example's first label never scored
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    padded = collate(examples, pad_token_id=0)
    assert count_target_tokens(batch) == count_target_tokens(padded) == 3
    assert count_real_tokens(batch) == count_real_tokens(padded) == 5


def test_packed_per_example_losses_equal_unpacked(tiny_llama) -> None:
    model = load_llama(tiny_llama)
    examples = make_examples(5)
    with torch.no_grad():
        unpacked = [float(plain_loss_sum(model, collate([example], 0))) for example in examples]
    packed = pack_collate(examples, 0)
    bounds = packed["cu_seq_lens_q"].tolist()

    assert enable_packed_attention(model)
    assert model.config._attn_implementation == VARLEN_ATTENTION
    logits = model(**model_inputs(packed), use_cache=False).logits
    assert per_example_losses(logits, packed["labels"], bounds) == pytest.approx(unpacked, rel=1e-5, abs=1e-5)
    # Evaluation (padded, no boundaries) under the varlen implementation is plain SDPA.
    padded = collate(examples, 0)
    assert float(plain_loss_sum(model, padded)) == pytest.approx(sum(unpacked), rel=1e-5)

    # The pitfall this guards against: plain SDPA with position ids and an all-ones mask lets
    # examples see each other, and the losses differ.
    restore_attention(model)
    leaky = model(**model_inputs(packed), use_cache=False).logits
    assert per_example_losses(leaky, packed["labels"], bounds)[1:] != pytest.approx(unpacked[1:], rel=1e-3)


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_and_gradients_equal_plain(tiny_llama, packed: bool) -> None:
    model = load_llama(tiny_llama)
    if packed:
        enable_packed_attention(model)
    examples = make_examples(6)
    batch = pack_collate(examples, 0) if packed else collate(examples, 0)

    plain, chunked, plain_grads, chunked_grads = plain_and_chunked(model, batch)

    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    assert plain_grads.keys() == dict(model.named_parameters()).keys()
    for name, grad in plain_grads.items():
        # Summation order differs, so compare against each gradient's own scale.
        scale = float(grad.abs().max())
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_autograd(with_bias: bool) -> None:
    """The fused head + cross-entropy: loss and every gradient equal autograd's, chunked or not."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (37,), generator=generator)

    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    (expected * 0.3).backward()  # a non-unit incoming gradient, as the loop's 1/target_tokens
    expected_grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    fused = LinearCrossEntropy.apply(hidden, weight, bias, targets, 8, torch.float32)  # 5 chunks, last partial
    (fused * 0.3).backward()

    assert float(fused) == pytest.approx(float(expected), rel=1e-6)
    for tensor, grad in zip([t for t in (hidden, weight, bias) if t is not None], expected_grads):
        torch.testing.assert_close(tensor.grad, grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 50), (8, 49152)])  # SmolLM2's vocabulary: the vectorised kernel's long rows
def test_softmax_written_over_the_logits_is_torchs(dtype, shape) -> None:
    """The fused head's softmax over its own logits (CPU): the same bits as torch.softmax, in the same storage."""
    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    expected = torch.softmax(logits, dim=-1)
    probabilities = softmax_rows(logits)
    assert probabilities.data_ptr() == logits.data_ptr()
    assert torch.equal(probabilities, expected)


def reference_head_loss_and_weight_gradient(hidden, weight, targets, chunk_tokens, dtype):
    """The fused head's sums written out with every temporary kept: the logits beside their softmax, the
    weight gradient's product copied to float32 before it is added, the scaled gradient a new tensor."""
    matrix, total = weight.to(dtype), torch.zeros(())
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        rows, chunk = hidden[start:start + chunk_tokens].to(dtype), targets[start:start + chunk_tokens]
        logits = rows @ matrix.T
        probabilities = torch.softmax(logits, dim=-1)
        log_norm = logits.amax(-1).float() - probabilities.amax(-1).float().log()
        total += (log_norm - logits.gather(1, chunk[:, None]).squeeze(1).float()).sum()
        probabilities[torch.arange(chunk.shape[0]), chunk] -= 1
        grad_weight += (probabilities.T @ rows).float()
    return total, grad_weight


@pytest.mark.parametrize("block_rows", [8192, 16])  # the default (one block here), and 4 blocks, the last partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_frees_its_temporaries_exactly(dtype, block_rows, monkeypatch) -> None:
    """The fused head drops each chunk's logits once softmaxed, adds the weight gradient's product without a
    float32 copy and a block of vocabulary rows at a time, and scales the kept gradient in place (full
    fine-tuning's peak, docs/speed.md): the loss and the weight gradient are bit for bit those of the
    written-out sums with every temporary kept."""
    monkeypatch.setattr("tunesmith.training.chunked_loss.WEIGHT_GRADIENT_ROWS", block_rows)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(29, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (29,), generator=generator)
    expected_loss, expected_grad = reference_head_loss_and_weight_gradient(hidden, weight, targets, 8, dtype)
    leaf = weight.clone().requires_grad_(True)
    loss = LinearCrossEntropy.apply(hidden, leaf, None, targets, 8, dtype)  # 4 chunks, last partial
    (loss * 0.37).backward()
    assert torch.equal(loss.detach(), expected_loss)
    assert torch.equal(leaf.grad, expected_grad * 0.37)


def test_chunked_loss_falls_back_for_wrapped_heads(tiny_llama) -> None:
    """A head that is not a plain Linear (here LoRA on lm_head) goes through the checkpointed chunks."""
    from peft import LoraConfig, get_peft_model

    model = load_llama(tiny_llama)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    batch = collate(make_examples(4), 0)
    plain, chunked, plain_grads, chunked_grads = plain_and_chunked(model, batch)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bfloat16_autocast_close_to_float32(tiny_llama) -> None:
    model = load_llama(tiny_llama)
    batch = pack_collate(make_examples(6), 0)
    enable_packed_attention(model)
    train, method = TrainSection(), build_method(FullMethod())
    full = apply_speed(model, method, SpeedSection(autocast="off"), train, CPU.device)
    fast = apply_speed(model, method, SpeedSection(autocast="bfloat16"), train, CPU.device)
    assert full.autocast_dtype is None and fast.autocast_dtype is torch.bfloat16

    reference = full.token_loss(model, batch)
    reference.backward()
    reference_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    autocast = fast.token_loss(model, batch)
    autocast.backward()
    autocast_grad = torch.cat([p.grad.flatten() for p in model.parameters()])

    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert float(autocast) == pytest.approx(float(reference), rel=2e-2)
    assert float(autocast) != float(reference)  # bfloat16 really ran
    assert F.cosine_similarity(autocast_grad, reference_grad, dim=0) > 0.99


def lora_losses_and_grads(path: str, speed: SpeedSection, steps: int = 3):
    """Three AdamW steps of LoRA on the tiny Llama: the losses, the last step's adapter gradients, the model."""
    torch.manual_seed(0)
    model = load_llama(path)
    method = build_method(LoraMethod(r=4, alpha=8))
    model = method.apply(model)
    setup = apply_speed(model, method, speed, TrainSection(), CPU.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = pack_collate(make_examples(6), 0), []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = setup.token_loss(model, batch) / 60
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    setup.undo()
    return losses, grads, model


def test_lora_frozen_base_held_in_bfloat16_under_autocast(tiny_llama) -> None:
    """Under bfloat16 autocast the frozen base is stored in bfloat16, the adapters stay float32, and three
    steps' losses stay within the autocast test's tolerance (2%) of a float32-held base under the same autocast."""
    from peft.tuners.lora import LoraLayer

    fast_losses, fast_grads, model = lora_losses_and_grads(tiny_llama, SpeedSection(autocast="bfloat16"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert all(module.cast_input_dtype_enabled for module in model.modules() if isinstance(module, LoraLayer))

    # Today's behaviour as the reference: the same run with the base left in float32.
    from tunesmith.methods.peft_method import PeftMethod

    PeftMethod.frozen_base_in_autocast_dtype = False
    try:
        held_losses, held_grads, reference = lora_losses_and_grads(tiny_llama, SpeedSection(autocast="bfloat16"))
    finally:
        PeftMethod.frozen_base_in_autocast_dtype = True
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    assert fast_losses == pytest.approx(held_losses, rel=2e-2)
    assert F.cosine_similarity(fast_grads, held_grads, dim=0) > 0.99

    with torch.no_grad():  # outside autocast (validation, generation) the bfloat16 base still runs
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_adapter_input_casts_skipped_under_autocast_change_nothing(tiny_llama) -> None:
    """Without peft's per-layer input casts the autocast forward makes fewer copies and the same loss and
    gradients bit for bit (bfloat16 -> float32 -> bfloat16 is exact); peft's setting is back afterwards."""
    from peft.tuners.lora import LoraLayer
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountCopies.copies += func.__name__.startswith("_to_copy")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    method = build_method(LoraMethod(r=4, alpha=8, dropout=0.0))  # no dropout: both forwards see the same
    model = method.apply(load_llama(tiny_llama))
    with torch.no_grad():  # B starts at zero: make the adapters' output (and A's gradient) non-zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    setup = apply_speed(model, method, SpeedSection(autocast="bfloat16", fused_lora=False), TrainSection(), CPU.device)
    batch = pack_collate(make_examples(6), 0)
    results = []
    for loss_fn in (setup.token_loss, functools.partial(autocast_loss_with_casts, setup)):
        model.zero_grad(set_to_none=True)
        CountCopies.copies = 0
        with CountCopies():
            loss = loss_fn(model, batch)
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad],
                        CountCopies.copies))
    (fast, fast_grads, fast_copies), (cast, cast_grads, cast_copies) = results
    assert torch.equal(fast, cast)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, cast_grads))
    assert fast_copies < cast_copies
    assert all(module.cast_input_dtype_enabled for module in model.modules() if isinstance(module, LoraLayer))


def autocast_loss_with_casts(setup, model, batch):
    """The run's token loss under autocast with peft's input casts left on (the reference)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return chunked_loss_sum(model, batch)


def test_frozen_base_keeps_float32_without_autocast(tiny_llama) -> None:
    _, _, model = lora_losses_and_grads(tiny_llama, SpeedSection(autocast="off"), steps=1)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_autocast_detection_defaults_to_native_bfloat16_and_says_why() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(SpeedSection(autocast="off"), cpu) is None
    assert autocast_dtype(SpeedSection(autocast="bfloat16"), cpu) is torch.bfloat16
    native = native_bfloat16(cpu)
    expected = torch.bfloat16 if native else None
    assert autocast_dtype(SpeedSection(autocast="auto"), cpu) is expected
    assert autocast_dtype(SpeedSection(), cpu) is expected  # the default is auto
    dtype, why = autocast_choice(SpeedSection(), cpu)
    flags = {"CPU has AMX": torch.cpu._is_amx_tile_supported(), "CPU has AVX-512 BF16": torch.cpu._is_avx512_bf16_supported()}
    if native:
        assert why.startswith("bfloat16 autocast (auto: CPU has ") and flags[why[len("bfloat16 autocast (auto: "):-1]]
    else:
        assert why == "float32 (autocast auto: no native bfloat16 on this CPU)"
    assert autocast_choice(SpeedSection(autocast="off"), cpu)[1] == "float32 (train.speed.autocast: off)"


def test_length_grouping_keeps_each_step_and_sorts_micro_batches() -> None:
    lengths = [3, 9, 1, 7, 5, 8, 2, 6, 4, 10, 11, 12]
    plain = StepSampler(len(lengths), batch_size=2, grad_accum=3, seed=3)
    grouped = LengthGroupedSampler(plain, lengths)
    for step in range(plain.steps_per_epoch * 2):
        chosen = sorted(i for batch in plain.micro_batches(step) for i in batch)
        regrouped = grouped.micro_batches(step)
        assert sorted(i for batch in regrouped for i in batch) == chosen
        flat = [lengths[i] for batch in regrouped for i in batch]
        assert flat == sorted(flat, reverse=True)
        assert [len(batch) for batch in regrouped] == [2, 2, 2]


def train_losses(model_path: str, speed: SpeedSection, examples: list[EncodedExample]) -> list[float]:
    """Two optimizer steps of full fine-tuning with two accumulated micro-batches."""
    model = load_llama(model_path)
    method = build_method(FullMethod())
    model = method.apply(model)
    train = TrainSection(batch_size=3, grad_accum=2, max_steps=2, lr=1e-3, schedule="constant", log_every=1,
                         speed=speed)
    setup = apply_speed(model, method, speed, train, CPU.device)
    data = EncodedData(train=examples, validation=None, template="none")
    lengths = [len(e.input_ids) for e in examples] if setup.group_by_length else None
    sampler = build_sampler(len(examples), [], train.batch_size, train.grad_accum, 1, 0, train.seed, lengths)
    losses = []

    class Record(Hook):
        def on_step(self, record): losses.append(record["loss"])

    seams = LoopSeams(TokenCrossEntropy(setup.token_loss, setup.collate_fn), sampler, hooks=(Record(),))
    Trainer(model, method, data, train, EvalSection(), CPU, 0, seams).fit()
    return losses


def test_packed_chunked_training_equals_plain_training(tiny_llama) -> None:
    examples = make_examples(12)
    exact = {"autocast": "off"}  # float32: the fast paths are exact there
    plain = train_losses(tiny_llama, SpeedSection(packing=False, chunked_loss=False, group_by_length=False, **exact),
                         examples)
    fast = train_losses(tiny_llama, SpeedSection(loss_chunk_tokens=16, **exact), examples)
    grouped = train_losses(tiny_llama, SpeedSection(packing=False, chunked_loss=False, **exact), examples)
    assert fast == pytest.approx(plain, rel=1e-5)
    assert grouped == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0]


def test_train_end_to_end_with_fast_options(tmp_path, tiny_llama, tiny_data, capsys) -> None:
    from tunesmith.config import validate_recipe
    from tunesmith.pipeline.finetune import finetune

    recipe = validate_recipe({
        "model": {"name": tiny_llama},
        "data": {"train": tiny_data, "max_length": 64, "template": "chatml"},
        "method": {"kind": "lora", "r": 4},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 2, "log_every": 1,
                  "speed": {"autocast": "auto", "activation_checkpointing": True, "loss_chunk_tokens": 64}},
        "output": {"dir": str(tmp_path / "run")},
    })
    summary = finetune(recipe, progress=False)
    assert summary["steps"] == 2 and summary["tokens_per_s"] > 0
    out = capsys.readouterr().out
    speed_line = next(line for line in out.splitlines() if line.startswith("speed: "))
    # compile: auto (the default) never compiles a tiny model's run; the line after it says why.
    assert "\ntorch.compile: off (auto: not measured with activation checkpointing)\n" in out
    assert autocast_choice(recipe.train.speed, torch.device("cpu"))[1] in speed_line  # what was chosen and why
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # Real tokens: every token read, no padding (packed), more than the scored ones.
    assert summary["tokens"] == records[-1]["tokens"] > 0
    saved = (tmp_path / "run" / "adapter" / "adapter_config.json").read_text()
    assert VARLEN_ATTENTION not in saved


@pytest.mark.parametrize("setting, releases", [(True, [True] * 6), (False, [False] * 6), ("auto", [True] * 6)])
def test_freed_memory_released_as_release_memory_says(tiny_llama, monkeypatch, setting, releases) -> None:
    """On glibc a full fine-tune's token loss hands freed pages back before every forward (true, and auto for
    full fine-tuning) or never (false); the run's log says which; the loss is the same."""
    import platform

    from tunesmith.training import speed
    from tunesmith.training.speed import release_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_freed_memory() is glibc
    model = load_llama(tiny_llama)
    method = build_method(FullMethod())
    examples = make_examples(12)
    batches = [pack_collate(examples[:count], 0) for count in (4, 2, 6, 6, 1, 9)]  # new longest: 1st, 3rd, 6th
    kept = apply_speed(model, method, SpeedSection(autocast="off", release_memory=False), TrainSection(), CPU.device)
    setup = apply_speed(model, method, SpeedSection(autocast="off", release_memory=setting), TrainSection(),
                        CPU.device)
    calls = []
    monkeypatch.setattr(speed, "release_freed_memory", lambda: calls.append(True) or True)
    seen = []
    with torch.no_grad():
        for batch in batches:
            before = len(calls)
            assert torch.equal(setup.token_loss(model, batch), kept.token_loss(model, batch))
            seen.append(len(calls) > before)
    phrase = {True: "released before every forward", False: "kept (train.speed.release_memory: false)",
              "auto": "released before every forward (auto: full fine-tuning)"}[setting]
    assert any(phrase in note for note in setup.notes) is (glibc or setting is False)
    assert seen == (releases if glibc else [False] * 6)


def test_auto_release_before_near_longest_batches_for_other_methods(monkeypatch) -> None:
    """``release_memory: auto`` outside full fine-tuning: freed pages go back before a batch with 3/4 or more of
    the longest one's tokens (66, 19, 95, 95, 6, 145: the 1st, 3rd, 4th and 6th), and the log says so."""
    import platform

    from tunesmith.training import speed
    from tunesmith.training.speed import releasing_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    loss_fn, note = releasing_memory(lambda model, batch: batch["input_ids"].sum(), SpeedSection(), CPU.device, "lora")
    assert ("released before a batch of 75%+ of the longest one's tokens (auto)" in note) is glibc
    calls = []
    monkeypatch.setattr(speed, "release_freed_memory", lambda: calls.append(True) or True)
    seen = []
    for tokens in (66, 19, 95, 95, 6, 145):
        before = len(calls)
        assert int(loss_fn(None, {"input_ids": torch.ones(1, tokens, dtype=torch.long)})) == tokens
        seen.append(len(calls) > before)
    assert seen == ([True, False, True, True, False, True] if glibc else [False] * 6)


@pytest.mark.parametrize("setting, on", [(True, True), (False, False), ("auto", False)])
def test_unresolved_auto_checkpointing_is_off(tiny_llama, setting, on) -> None:
    """``auto`` is resolved by ``tunesmith train``'s plan check; a run started from Python without it does not
    recompute activations (the string 'auto' once counted as true)."""
    model = load_llama(tiny_llama)
    apply_speed(model, build_method(FullMethod()), SpeedSection(autocast="off", activation_checkpointing=setting),
                TrainSection(), CPU.device)
    assert model.is_activation_checkpointing is on


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_mlp_leaves_packed_loss_and_gradients_bit_for_bit(tiny_llama, checkpointing) -> None:
    """train.speed.fused_mlp through apply_speed (full fine-tuning, packed, bfloat16 autocast): the same loss and
    gradients as with it off, bit for bit; under activation checkpointing the product is not recomputed."""
    batch = pack_collate(make_examples(6), 0)
    results = []
    for fused in (False, True):
        model, method = load_llama(tiny_llama), build_method(FullMethod())
        setup = apply_speed(model, method, SpeedSection(autocast="bfloat16", fused_mlp=fused,
                                                        activation_checkpointing=checkpointing),
                            TrainSection(), CPU.device)
        mlps = [m for m in model.modules() if "forward" in m.__dict__ and hasattr(m, "down_proj")]
        assert len(mlps) == (model.config.num_hidden_layers if fused else 0)
        forward = _fused_forward_keeping_product if checkpointing else _fused_forward  # recompute_product off/on
        assert all(m.forward.__func__ is forward for m in mlps)
        loss = setup.token_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
        setup.undo()
    (plain, plain_grads), (fused, fused_grads) = results
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, plain_grads))


@pytest.mark.parametrize("compiled_attention", [True, False])
def test_compiled_attention_lever_marks_the_packed_attention(tiny_llama, compiled_attention) -> None:
    """Under compile with packed rows, ``compiled_attention`` decides whether the attention modules take the compiled
    backward (their mark), and the run's speed line says so; the setup's restore takes the marks off again."""
    from tunesmith.training.packed_attention import COMPILED_BACKWARD

    model = load_llama(tiny_llama)
    section = SpeedSection(autocast="off", compile=True, compiled_attention=compiled_attention)
    setup = apply_speed(model, build_method(FullMethod()), section, TrainSection(), CPU.device)
    attentions = [layer.self_attn for layer in model.model.layers]
    try:
        assert setup.packing
        assert [getattr(module, COMPILED_BACKWARD, False) for module in attentions] == [compiled_attention] * len(attentions)
        assert ("compiled attention backward" in setup.notes) is compiled_attention
    finally:
        for restore in setup.restore:
            restore()
    assert not any(hasattr(module, COMPILED_BACKWARD) for module in attentions)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [1e-6, 1e3, None])
def test_clip_and_step_updates_as_clip_grad_norm_then_step(fused: bool, max_norm) -> None:
    """The loop's clip folded into fused AdamW's pass: the weights clip_grad_norm_ + step give, to one rounding
    where the gradients are scaled (1e-6: every step clips, to gradients near AdamW's eps, so an unclipped step
    lands far off), bit for bit where they are not (1e3, None) and without the fused kernel (the plain multiply)."""
    from tunesmith.training.schedule import clip_and_step

    def parameters_and_optimizer():
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(shape)) for shape in ((64, 32), (32,), (7, 5))]
        return weights, torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1, fused=fused or None)

    (reference, reference_optimizer), (ours, optimizer), (unclipped, plain) = (parameters_and_optimizer()
                                                                               for _ in range(3))
    for step in range(3):
        gradients = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i))
                     for i, p in enumerate(reference)]
        for weights in (reference, ours, unclipped):
            for p, g in zip(weights, gradients):
                p.grad = g.clone()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(reference, max_norm)
        reference_optimizer.step()
        plain.step()
        clip_and_step(optimizer, ours, max_norm, torch.nn.utils.get_total_norm([p.grad for p in ours]))
        assert not hasattr(optimizer, "grad_scale")  # taken off again: the next step is not scaled by it
    for mine, theirs, off in zip(ours, reference, unclipped):
        if max_norm == 1e-6:
            assert (off - theirs).abs().max() > 1e-3  # the clip matters here
        if fused and max_norm == 1e-6:
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(mine, theirs)


def test_undo_gives_the_layers_their_eager_call_again(tiny_llama) -> None:
    """Compile's undo takes each decoder layer's compiled call off: the evaluation and generation after training call
    the layers eagerly (with a KV cache they recompiled each layer up to dynamo's limit and logged its warning)."""
    import torch._dynamo

    model = load_llama(tiny_llama)
    suppress_errors = torch._dynamo.config.suppress_errors
    setup = apply_speed(model, build_method(FullMethod()), SpeedSection(autocast="off", compile=True), TrainSection(),
                        CPU.device)
    layers = list(model.model.layers)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    setup.undo()
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert torch._dynamo.config.suppress_errors == suppress_errors


@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_layers_recompute_the_mlp_product_by_selective_checkpointing(tiny_llama, compiled) -> None:
    """Compiled, the fused MLP recomputes its product by selective checkpointing, which dynamo traces: the saved-tensor
    hook that recomputes it eagerly would split each layer's graph (a graph break). Eager runs keep the hook."""
    model = load_llama(tiny_llama)
    section = SpeedSection(autocast="off", compile=compiled)
    setup = apply_speed(model, build_method(FullMethod()), section, TrainSection(), CPU.device)
    try:
        forward = _fused_forward_compiled if compiled else _fused_forward
        assert [layer.mlp.forward.__func__ for layer in model.model.layers] == [forward] * len(model.model.layers)
    finally:
        setup.undo()


@pytest.mark.slow  # compiles the layers' forward and backward: 30-110 s on a busy machine
def test_compiled_fused_mlp_has_no_graph_break(tiny_llama) -> None:
    """The compiled layer's MLP traces as one graph: no graph break on saved-tensor hooks (session 10's profile had
    three per layer, with down_proj and the residual run eagerly)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = load_llama(tiny_llama)
    setup = apply_speed(model, build_method(FullMethod()), SpeedSection(autocast="off", compile=True), TrainSection(),
                        CPU.device)
    try:
        batch = pack_collate([EncodedExample(tuple(range(3, 3 + n)), tuple(range(3, 3 + n))) for n in (7, 12)], 0)
        setup.token_loss(model, batch).backward()
        reasons = " | ".join(str(reason) for reason in counters["graph_break"])
        assert "saved_tensors" not in reasons, reasons
        assert counters["stats"]["unique_graphs"] > 0  # the layers did compile
        kept = {}

        def pack(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tuple(tensor.shape)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = setup.token_loss(model, batch)
        loss.backward()
        wide = [shape for shape in kept.values() if shape == (19, model.config.intermediate_size)]  # (tokens, ·)
        assert len(wide) == 2 * model.config.num_hidden_layers  # gate and up: the product is recomputed
    finally:
        setup.undo()
        torch._dynamo.reset()
