"""train.speed.compile: 'auto' decides by the planned run (never in tiny runs or the quick start), a failed compile
runs eagerly, and compiled training keeps the loss curve."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tunesmith.config import EvalSection, FullMethod, LoraMethod, SpeedSection, TrainSection, load_recipe
from tunesmith.core.runtime import Runtime
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.data.encoded import EncodedData
from tunesmith.methods import build_method, count_parameters
from tunesmith.training.hooks import Hook
from tunesmith.training.loop import LoopSeams, Trainer
from tunesmith.training.objective import TokenCrossEntropy
from tunesmith.training.packing import pack_collate
from tunesmith.training.sampler import build_sampler
from tunesmith.training.speed import (
    COMPILE_SECONDS,
    COMPILE_SPEEDUP,
    Workload,
    apply_speed,
    compile_choice,
    planned_workload,
)

CPU = torch.device("cpu")
AUTO = SpeedSection()  # compile: auto is the default
SMOLLM2_LORA = (4_884_480, 139_399_488)  # trainable, total: the quick start's method line (README)
LOSS_TOLERANCE = 0.01  # nats per step, benchmarks/speed.py's "same curve"


def smollm2_workload(steps: int, tokens_per_step: float, **changes) -> Workload:
    trainable, total = SMOLLM2_LORA
    return replace(Workload(steps, tokens_per_step, 4.0 * total + 2.0 * trainable, parameters=total), **changes)


def examples(count: int, seed: int = 0) -> list[EncodedExample]:
    generator = torch.Generator().manual_seed(seed)
    made = []
    for index in range(count):
        ids = torch.randint(3, 512, (6 + (index * 7) % 23,), generator=generator).tolist()
        made.append(EncodedExample(tuple(ids), tuple([IGNORE_INDEX] + ids[1:])))
    return made


def test_auto_compiles_only_where_the_planned_steps_pay_back() -> None:
    """The rule: planned steps x planned step seconds x (1 - 1/speedup) against the compile's seconds, in one line."""
    bf16 = torch.bfloat16
    long_run = smollm2_workload(2000, 8 * 512)  # about 2 s a step, an hour and more
    on, line = compile_choice(AUTO, "lora", CPU, bf16, long_run)
    assert on and line.startswith("torch.compile: on (auto: ~2000 planned steps × ~")
    assert f"compile ~{COMPILE_SECONDS:.0f} s" in line
    saving = long_run.steps * long_run.step_seconds * (1 - 1 / COMPILE_SPEEDUP["lora"])
    assert f"would save ~{saving:.0f} s" in line
    # Just under and just over the break-even number of steps.
    per_step = long_run.step_seconds * (1 - 1 / COMPILE_SPEEDUP["full"])
    even = COMPILE_SECONDS / per_step
    assert not compile_choice(AUTO, "full", CPU, bf16, replace(long_run, steps=int(even) - 1))[0]
    assert compile_choice(AUTO, "full", CPU, bf16, replace(long_run, steps=int(even) + 2))[0]
    # true/false keep their meaning whatever the run.
    assert compile_choice(SpeedSection(compile=True), "dora", torch.device("cuda"), None, None) == \
        (True, "torch.compile: on (train.speed.compile: true)")
    assert compile_choice(SpeedSection(compile=False), "lora", CPU, bf16, long_run)[0] is False


@pytest.mark.parametrize("change, why", [
    (dict(device=torch.device("cuda")), "not measured on CUDA"),
    (dict(processes=2), "not measured with several processes"),
    (dict(quantized=True), "not measured on a quantised base"),
    (dict(section=SpeedSection(activation_checkpointing=True)), "not measured with activation checkpointing"),
    (dict(kind="dora"), "not measured for method dora"),
    (dict(dtype=None), "measured under bfloat16 autocast only"),
    (dict(stage="dpo"), "not measured for stage dpo"),
    (dict(parameters=1_711_376_384), "no gain measured above 200M parameters"),  # a 1.7B base
    (dict(workload=None), "the run's steps are not known here"),
])
def test_auto_stays_off_where_compile_was_not_measured(change, why) -> None:
    """A run that would pay back on the measured CPU path stays eager wherever the figures were not taken."""
    workload = smollm2_workload(5000, 8 * 512)
    fields = {"processes", "quantized", "stage", "parameters"}
    workload = replace(workload, **{k: v for k, v in change.items() if k in fields}) if change.get("workload", 1) else None
    args = dict(section=AUTO, kind="full", device=CPU, dtype=torch.bfloat16, workload=workload)
    args.update({k: v for k, v in change.items() if k not in fields and k != "workload"})
    assert compile_choice(**args) == (False, f"torch.compile: off (auto: {why})")


def test_quick_start_and_tiny_model_runs_stay_eager(tiny_llama) -> None:
    """The README quick start (even with every example at data.max_length) and the test suite's tiny models
    (even at thousands of steps) never compile under the default."""
    from transformers import AutoModelForCausalLM

    quick = load_recipe("examples/quickstart.yaml")
    assert quick.train.speed.compile == "auto"
    bound = smollm2_workload(quick.train.max_steps, quick.data.max_length * quick.train.batch_size)
    on, line = compile_choice(quick.train.speed, quick.method.kind, CPU, torch.bfloat16, bound)
    assert not on and line.startswith("torch.compile: off (auto: ~40 planned steps × ~")

    model = build_method(FullMethod()).apply(AutoModelForCausalLM.from_pretrained(tiny_llama))
    tiny = Workload(10_000, 64 * 8 * 4, 6.0 * count_parameters(model)[1])
    assert not compile_choice(AUTO, "full", CPU, torch.bfloat16, tiny)[0]


def test_planned_steps_are_the_trainers_own_and_outlive_a_resume(tiny_llama) -> None:
    """The decision reads the run's planned steps (the Trainer's total, not the steps left) and the data's lengths:
    a resumed run decides the same way."""
    from transformers import AutoModelForCausalLM

    from tunesmith.config import validate_recipe

    data = EncodedData(train=examples(30), validation=None, template="none")
    recipe = validate_recipe({"model": {"name": tiny_llama}, "data": {"train": "unused.jsonl"},
                              "method": {"kind": "full"}, "train": {"epochs": 2.5, "batch_size": 3, "grad_accum": 2}})
    model = build_method(FullMethod()).apply(AutoModelForCausalLM.from_pretrained(tiny_llama))
    workload = planned_workload(recipe, data, count_parameters(model), 1)
    train = recipe.train
    sampler = build_sampler(len(data.train), [], train.batch_size, train.grad_accum, 1, 0, train.seed)
    trainer = Trainer(model, build_method(FullMethod()), data, train, EvalSection(), Runtime(CPU), 0,
                      LoopSeams(TokenCrossEntropy(None, None), sampler))
    assert workload.steps == trainer.total_steps == round(2.5 * (30 // 6))
    mean = sum(len(e.input_ids) for e in data.train) / 30
    assert workload.tokens_per_step == pytest.approx(mean * 6)
    assert workload.parameters == count_parameters(model)[1]
    trainer.state.step = 3  # as after a resume: nothing the workload reads has changed
    assert planned_workload(recipe, data, count_parameters(model), 1) == workload


def load_llama(path: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()


@pytest.mark.slow  # dynamo traces every layer before the compiler fails: 10-20 s here
def test_failed_compile_runs_the_layers_eagerly(tiny_llama, monkeypatch) -> None:
    """Where the compiler fails (here: inductor raises), dynamo runs each layer eagerly: same loss, the run goes on."""
    import torch._dynamo
    import torch._inductor.compile_fx

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("this layer cannot be compiled")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    torch._dynamo.reset()
    batch = pack_collate(examples(4), 0)
    losses = []
    for compiled in (False, True):
        model = load_llama(tiny_llama)
        method = build_method(FullMethod())
        setup = apply_speed(model, method, SpeedSection(autocast="off", compile=compiled), TrainSection(), CPU)
        assert ("torch.compile" in setup.notes) is compiled
        try:
            loss = setup.token_loss(model, batch)
            loss.backward()
            losses.append(loss.detach())
        finally:
            setup.undo()
    torch._dynamo.reset()
    assert calls  # the compiler was asked, and failed
    assert torch.equal(losses[0], losses[1])


def train_losses(model_path: str, speed: SpeedSection, method_config) -> list[float]:
    """Four optimizer steps of two accumulated packed micro-batches; each step's loss."""
    model = load_llama(model_path)
    method = build_method(method_config)
    model = method.apply(model)
    train = TrainSection(batch_size=3, grad_accum=2, max_steps=4, lr=1e-3, schedule="constant", log_every=1, speed=speed)
    setup = apply_speed(model, method, speed, train, CPU)
    data = EncodedData(train=examples(24), validation=None, template="none")
    sampler = build_sampler(len(data.train), [], train.batch_size, train.grad_accum, 1, 0, train.seed)
    losses = []

    class Record(Hook):
        def on_step(self, record): losses.append(record["loss"])

    seams = LoopSeams(TokenCrossEntropy(setup.token_loss, setup.collate_fn), sampler, hooks=(Record(),))
    try:
        Trainer(model, method, data, train, EvalSection(), Runtime(CPU), 0, seams).fit()
    finally:
        setup.undo()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("method", [LoraMethod(r=4, dropout=0.0), FullMethod()], ids=["lora", "full"])
def test_compiled_training_keeps_the_loss_curve(tiny_llama, method) -> None:
    """compile: true against eager under bfloat16 autocast (the setting auto compiles in): every step's loss within
    benchmarks/speed.py's tolerance of the same curve."""
    import torch._dynamo

    speed = SpeedSection(autocast="bfloat16")
    eager = train_losses(tiny_llama, speed.model_copy(update={"compile": False}), method)
    torch._dynamo.reset()
    compiled = train_losses(tiny_llama, speed.model_copy(update={"compile": True}), method)
    torch._dynamo.reset()
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < LOSS_TOLERANCE
    assert len(compiled) == len(eager) == 4
