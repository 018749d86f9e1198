"""tunesmith against the plain Hugging Face stack: real tokens/s, peak RSS, MFU, final loss.

One invocation runs, for LoRA (r=16 on every linear layer) and full fine-tuning, the reference
stack (``transformers.Trainer`` + ``peft``) in the configurations a user would choose (float32
padded; ``bf16=True``; ``bf16=True`` with transformers' padding-free ``DataCollatorWithFlattening``)
and tunesmith with its default ``train.speed``, on the same model and the same variable-length
examples in the same order, each configuration in its own subprocess (so peak RSS is its own).
tunesmith's ratios are reported against every reference configuration and against the fastest.
Configurations are interleaved within each repeat and medians are reported: on a shared machine
only the ratios measured in one run mean anything.

    python benchmarks/speed.py              # model S: hidden 512, 8 layers, vocab 32,000 (~42M)
    python benchmarks/speed.py --quick      # a small model, to check the script in a minute
    python benchmarks/speed.py --model smollm2 --repeats 1 --steps 5   # SmolLM2 + alpaca demo via `tunesmith train`

After the table, one more process profiles tunesmith's step (torch.profiler, ``--profile-steps`` steps
after a warm-up) and prints each op group's share of it and the share of everything that is not a
matrix product (``--no-profile`` skips it).

Real tokens are input tokens without padding; the first optimizer step is warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TUNESMITH_TEST_ASSETS", REPO.parent / "shared" / "assets"))
sys.path.insert(0, str(REPO / "src"))

from tunesmith.core.runtime import peak_memory_mb  # noqa: E402  (after the path is set)

MODELS = {
    "S": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=32000, lengths=(32, 512)),
    "XS": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=8192, lengths=(32, 256)),
    "quick": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=4096, lengths=(16, 128)),
}
# The reference stack's configurations: what a user of Trainer + peft would switch on.
REFERENCES = {
    "fp32": {"bf16": False, "flat": False},
    "bf16": {"bf16": True, "flat": False},
    "bf16-flat": {"bf16": True, "flat": True},
}
METHODS = ("lora", "full")
BATCH, LR, PROMPT_SHARE = 8, 2e-4, 0.3
LOSS_TOLERANCE = 0.01  # nats: the largest per-step gap from the reference's loss curve that counts as the same curve


# ---------------------------------------------------------------- shared: model, data, FLOPs

def build_model(size: str):
    """The generated Llama model, identically initialised in every process (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {k: v for k, v in MODELS[size].items() if k != "lengths"}
    config = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def build_examples(size: str, count: int):
    """Chat-like examples: lengths uniform in the model's range, the first 30% a masked prompt.

    Tokens follow a Zipf law over the vocabulary so the loss falls as in real data.
    """
    from tunesmith.data.encode import IGNORE_INDEX, EncodedExample

    low, high = MODELS[size]["lengths"]
    vocab = MODELS[size]["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    examples = []
    for _ in range(count):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        ids = torch.multinomial(zipf, length, replacement=True, generator=generator).tolist()
        prompt = max(1, int(length * PROMPT_SHARE))
        examples.append(EncodedExample(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:])))
    return examples


def training_flops(model, lora: bool, lengths: list[int]) -> float:
    """Model FLOPs of one training pass over examples of ``lengths`` (real tokens only).

    full = 3·(2·N·T + 4·L·d·Σl²); LoRA = 4·N·T + 6·N_lora·T + 3·4·L·d·Σl², with N the linear
    weights including the output head, T the tokens, l each example's length.
    """
    config = model.config
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    tokens, squares = sum(lengths), sum(length * length for length in lengths)
    attention = 4 * config.num_hidden_layers * config.hidden_size * squares
    if not lora:
        return 3 * (2 * linear * tokens + attention)
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return 4 * linear * tokens + 6 * adapters * tokens + 3 * attention


def matmul_ceiling(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of LLM-shaped matrix products (tokens 2048 × hidden 512 × FFN 1376) on this machine."""
    a, b = torch.randn(2048, 512, dtype=dtype), torch.randn(512, 1376, dtype=dtype)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * 2048 * 512 * 1376 * count / (time.perf_counter() - started) / 1e9


# ---------------------------------------------------------------- one configuration (subprocess)

def run_reference(model, examples, steps: int, lora: bool, config: str,
                  order: Optional[list[int]] = None) -> tuple[list[float], list[float]]:
    """transformers.Trainer (+ peft LoRA) as a user sets it up: ``config`` is one of REFERENCES.

    ``fp32``: float32, examples padded per batch; ``bf16``: ``bf16=True`` (bfloat16 autocast, float32
    master weights); ``bf16-flat``: bf16 and transformers' own padding-free path,
    ``DataCollatorWithFlattening`` (one row per batch, ``position_ids`` restarting at each example,
    the KV cache off so that transformers builds the per-example mask from them). Examples are
    taken in ``order`` (default: as given).
    """
    from torch.utils.data import Sampler
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from tunesmith.training.batching import collate

    options = REFERENCES[config]
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    stamps, losses = [], []
    indices = list(order) if order is not None else list(range(len(examples)))

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Sampler):
        def __len__(self):
            return len(indices)

        def __iter__(self):
            return iter(indices)

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return InOrder()

    if options["flat"]:
        model.config.use_cache = False  # packed sequences are detected from position_ids only without a cache
        flatten = DataCollatorWithFlattening()

        def data_collator(batch):
            return flatten([{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in batch])
    else:
        def data_collator(batch):
            return collate(batch, 0)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps,
                                 learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                                 weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                                 report_to=[], seed=0, use_cpu=not torch.cuda.is_available(),
                                 remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                                 bf16=options["bf16"])
        trainer = InOrderTrainer(model=model, args=args, train_dataset=examples, callbacks=[Clock()],
                                 data_collator=data_collator)
        trainer.train()
    return stamps, losses


def run_tunesmith(model, examples, steps: int, lora: bool, speed: dict) -> tuple[list[float], list[float]]:
    """tunesmith's loop with ``train.speed`` options, examples in the given order."""
    from tunesmith.config import EvalSection, FullMethod, LoraMethod, SpeedSection, TrainSection
    from tunesmith.core.runtime import Runtime
    from tunesmith.data.encoded import EncodedData
    from tunesmith.methods import build_method
    from tunesmith.training.hooks import Hook
    from tunesmith.training.loop import LoopSeams, Trainer
    from tunesmith.training.objective import TokenCrossEntropy
    from tunesmith.training.speed import apply_speed

    method = build_method(LoraMethod(r=16, alpha=32, dropout=0.0, targets="all-linear") if lora else FullMethod())
    model = method.apply(model)
    train = TrainSection(batch_size=BATCH, lr=LR, schedule="constant", max_steps=steps, log_every=10**6,
                         speed=SpeedSection(**speed))
    runtime = Runtime(torch.device("cpu"))
    setup = apply_speed(model, method, train.speed, train, runtime.device)
    stamps, losses = [], []

    class Clock(Hook):
        def on_step(self, record):
            stamps.append(time.perf_counter())
            losses.append(record["loss"])

    data = EncodedData(train=examples, validation=None, template="none")
    seams = LoopSeams(TokenCrossEntropy(setup.token_loss, setup.collate_fn), InOrder(len(examples)), hooks=(Clock(),))
    trainer = Trainer(model, method, data, train, EvalSection(), runtime, 0, seams)
    trainer.fit()
    return stamps, losses


class InOrder:
    """Step s takes examples [s·batch, (s+1)·batch): the reference's order exactly."""

    def __init__(self, count: int) -> None:
        self.steps_per_epoch = count // BATCH

    def epoch_of(self, step: int) -> int:
        return 0

    def micro_batches(self, step: int) -> list[list[int]]:
        return [list(range(step * BATCH, (step + 1) * BATCH))]

    def describe(self, step: int) -> dict:
        return {}


def smollm2_recipe(folder: Path, method: str, steps: int, speed: dict) -> dict:
    """The SmolLM2 run: the alpaca demo set (real chat data of varied length) in ChatML, batch 8."""
    data = ASSETS / "data" / "llama_factory" / "alpaca_en_demo.json"
    if not data.exists():
        raise SystemExit(f"{data} is missing (set TUNESMITH_TEST_ASSETS to the shared assets folder)")
    kind = {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"} if method == "lora" \
        else {"kind": "full"}
    return {"model": {"name": "smollm2-135m-instruct"}, "data": {"train": str(data), "max_length": 512},
            "method": kind,
            "train": {"max_steps": steps, "batch_size": BATCH, "lr": LR, "schedule": "constant", "warmup_ratio": 0.0,
                      "weight_decay": 0.0, "max_grad_norm": 1.0, "log_every": 1, "seed": 0, "speed": speed},
            "output": {"dir": str(folder / "run"), "overwrite": True}}


def smollm2_model_and_examples(method: str, steps: int):
    """SmolLM2 (float32, as loaded) and the alpaca examples tunesmith prepares, in its sampler's order for ``steps``."""
    from tunesmith.config import validate_recipe
    from tunesmith.core.runtime import cache_dir
    from tunesmith.data import encode_data
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.training.sampler import StepSampler

    with tempfile.TemporaryDirectory() as folder:
        recipe = validate_recipe(smollm2_recipe(Path(folder), method, steps, {}))
    model, tokenizer = load_model_and_tokenizer(recipe.model, cache_dir(), torch.device("cpu"))
    examples = encode_data(recipe.data, tokenizer, recipe.train.seed).train
    sampler = StepSampler(len(examples), BATCH, 1, 1, 0, recipe.train.seed)
    order = [i for step in range(steps) for i in sampler.micro_batches(step)[0]]
    return model, examples, order


def smollm2_reference(args) -> dict:
    """The reference on SmolLM2 and the examples tunesmith prepares, in the order tunesmith's sampler takes them."""
    model, examples, order = smollm2_model_and_examples(args.method, args.steps)
    lora = args.method == "lora"
    stamps, losses = run_reference(model, examples, args.steps, lora, args.stack.split(":")[1], order)
    peak = peak_memory_mb(torch.device("cpu"))  # before the FLOP count below touches any memory
    lengths = [len(examples[i].input_ids) for i in order[BATCH:]]  # step 1 is warm-up
    seconds = stamps[-1] - stamps[0]
    # run_reference wrapped ``model`` in peft in place for LoRA: count its linear weights and adapters.
    return {"tokens_per_s": sum(lengths) / seconds, "flops_per_s": training_flops(model, lora, lengths) / seconds,
            "peak_rss_mb": peak, "losses": losses, "final_loss": losses[-1]}


def smollm2_tunesmith(method: str, steps: int, speed: dict, env: dict) -> dict:
    """``tunesmith train`` in its own process; per-step tokens/s and losses from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "recipe.yaml"
        recipe.write_text(json.dumps(smollm2_recipe(Path(folder), method, steps, speed)))  # JSON is YAML
        done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(recipe), "--no-progress"],
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"tunesmith train failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(folder) / "run" / "summary.json").read_text())
    steps_logged = [r for r in records if "loss" in r and "tokens_per_s" in r]
    timed = steps_logged[1:]  # step 1 is warm-up
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(steps_logged, steps_logged[1:])]
    seconds = sum(t / r["tokens_per_s"] for t, r in zip(tokens, timed))
    first_lines = [line for line in done.stdout.splitlines() if line.startswith(("speed:", "threads:", "torch.compile:"))]
    first_step = steps_logged[0]["step_s"]  # the warm-up: a compile falls in it
    return {"tokens_per_s": sum(tokens) / seconds, "flops_per_s": None, "peak_rss_mb": summary["peak_memory_mb"],
            "losses": [r["loss"] for r in steps_logged], "final_loss": steps_logged[-1]["loss"],
            "notes": first_lines + [f"first step {first_step:.1f} s"]}


# Every op of the profile falls in one group; the first pattern that matches the op's name wins.
PROFILE_GROUPS = (
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("loss softmax (fused head)", ("aten::_softmax", "aten::amax", "aten::softmax")),
    ("elementwise (mul, add, norms, SiLU, RoPE)", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow",
                                                   "aten::silu", "aten::rsqrt", "aten::sqrt", "aten::neg",
                                                   "aten::mean", "aten::sum", "aten::cat", "aten::fill_",
                                                   "aten::zero_", "aten::where", "aten::exp")),
)


def profile_step(args) -> dict:
    """torch.profiler over ``args.steps`` tunesmith steps after one warm-up step: self-CPU share per op group.

    The step is the benchmark's: its examples, its method, ``apply_speed`` with ``--speed``, AdamW.
    """
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.config import FullMethod, LoraMethod, SpeedSection, TrainSection
    from tunesmith.methods import build_method
    from tunesmith.training.speed import apply_speed

    lora = args.method == "lora"
    if args.size == "smollm2":
        model, examples, order = smollm2_model_and_examples(args.method, args.steps + 1)
    else:
        model, examples = build_model(args.size), build_examples(args.size, BATCH * (args.steps + 1))
        order = list(range(len(examples)))
    method = build_method(LoraMethod(r=16, alpha=32, dropout=0.0, targets="all-linear") if lora else FullMethod())
    model = method.apply(model)
    train = TrainSection(batch_size=BATCH, lr=LR, speed=SpeedSection(**json.loads(args.speed)))
    setup = apply_speed(model, method, train.speed, train, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                  fused=train.speed.fused_optimizer or None)  # as training/schedule.py builds it

    def step(index: int) -> int:
        batch = setup.collate_fn([examples[i] for i in order[index * BATCH:(index + 1) * BATCH]], 0)
        setup.token_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        tokens = sum(step(index) for index in range(1, args.steps + 1))
        seconds = time.perf_counter() - started
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: 0.0 for name, _ in PROFILE_GROUPS} | {"other": 0.0}
    for event in events:
        group = next((name for name, patterns in PROFILE_GROUPS if any(p in event.key for p in patterns)), "other")
        shares[group] += event.self_cpu_time_total / total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"shares": shares, "tokens": tokens, "seconds": seconds, "notes": setup.describe().replace("\n", "; "),
            "top": [(e.key, e.self_cpu_time_total / total, e.count) for e in top]}


def profile_report(profiles: dict) -> str:
    """One column per method: the share of each op group and the non-matmul share of the step."""
    methods = list(profiles)
    lines = [f"Profile of tunesmith's step (torch.profiler, self CPU time; {profiles[methods[0]]['notes']})", "",
             "| op group | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for group in profiles[methods[0]]["shares"]:
        lines.append(f"| {group} | " + " | ".join(f"{100 * profiles[m]['shares'][group]:.0f}%" for m in methods) + " |")
    lines.append("| **everything but matrix products** | " + " | ".join(
        f"**{100 * (1 - profiles[m]['shares']['matrix products']):.0f}%**" for m in methods) + " |")
    lines.append("| profiled tokens/s (profiler on) | " + " | ".join(
        f"{profiles[m]['tokens'] / profiles[m]['seconds']:.0f}" for m in methods) + " |")
    for method in methods:
        lines.append("")
        lines.append(f"{method}, largest ops: " + ", ".join(f"{key} {100 * share:.1f}% ({count})"
                                                            for key, share, count in profiles[method]["top"]))
    return "\n".join(lines)


def worker(args) -> dict:
    """Train one configuration; returns its measurements (printed as JSON by the subprocess)."""
    lora = args.method == "lora"
    if args.profile:
        return profile_step(args)
    if args.size == "smollm2":
        return smollm2_reference(args)
    model = build_model(args.size)
    examples = build_examples(args.size, BATCH * args.steps)
    speed = json.loads(args.speed)
    if args.stack.startswith("reference:"):
        stamps, losses = run_reference(model, examples, args.steps, lora, args.stack.split(":")[1])
    else:
        stamps, losses = run_tunesmith(model, examples, args.steps, lora, speed)
    timed = examples[BATCH:BATCH * args.steps]  # step 1 is warm-up
    lengths = [len(e.input_ids) for e in timed]
    seconds = stamps[-1] - stamps[0]
    flop_model = build_model(args.size)
    if lora:
        from peft import LoraConfig, get_peft_model

        flop_model = get_peft_model(flop_model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    return {"tokens_per_s": sum(lengths) / seconds, "flops_per_s": training_flops(flop_model, lora, lengths) / seconds,
            "peak_rss_mb": peak_memory_mb(torch.device("cpu")), "losses": losses,
            "final_loss": losses[-1]}


# ---------------------------------------------------------------- the comparison

def stack_environment(stack: str, reference_policy: str) -> dict:
    """tunesmith runs with the thread policy its CLI sets at start (idle OpenMP threads sleep).

    The reference gets the same policy by default, so that the ratios compare the stacks, not the
    policies (on a busy machine torch's spin-waiting alone makes it several times slower:
    benchmarks/busy.py); ``--reference-policy torch`` gives it torch's defaults instead.
    """
    from tunesmith.core.runtime import thread_environment

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    same = stack.startswith("tunesmith") or reference_policy == "tunesmith"
    return {**env, **thread_environment(env)} if same else env


def run_configuration(size: str, stack: str, method: str, steps: int, speed: dict, threads,
                      reference_policy: str = "tunesmith", source: Optional[str] = None) -> dict:
    env = stack_environment(stack, reference_policy)
    if source:  # another checkout's package (--before-src): a change without a lever, A/B'd in one run
        env["PYTHONPATH"] = str(Path(source).resolve())
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if size == "smollm2" and stack.startswith("tunesmith"):
        return smollm2_tunesmith(method, steps, speed, env)
    command = [sys.executable, __file__, "--worker", "--size", size, "--stack", stack, "--method", method,
               "--steps", str(steps), "--speed", json.dumps(speed)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{stack}/{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def fill_flops(results: dict, stacks: list[str], method: str) -> None:
    """Give runs that could not count FLOPs (``tunesmith train`` on SmolLM2) the reference's FLOPs per token.

    Every stack trains the same examples in the same order, so the model FLOPs per real token are
    the same; MFU then compares the stacks exactly as tokens/s does.
    """
    counted = [run for stack in stacks for run in results[(stack, method)] if run["flops_per_s"] is not None]
    if not counted:
        return
    per_token = statistics.median(run["flops_per_s"] / run["tokens_per_s"] for run in counted)
    for stack in stacks:
        for run in results[(stack, method)]:
            if run["flops_per_s"] is None:
                run["flops_per_s"] = per_token * run["tokens_per_s"]


def report(results: dict, ceilings: dict, stacks: list[str]) -> str:
    """A Markdown table: medians per configuration, and tunesmith against each reference and the fastest one."""
    lines = [f"matmul ceiling: float32 {ceilings['float32']:.0f} GFLOP/s, bfloat16 {ceilings['bfloat16']:.0f} GFLOP/s; "
             f"loss gap = largest per-step gap from the float32 reference's curve (same curve: within {LOSS_TOLERANCE})",
             "", "| method | stack | real tokens/s | peak RSS (MB) | MFU of bf16 ceiling | MFU of fp32 ceiling "
             "| final loss | loss gap | tunesmith speed / this | tunesmith RSS / this |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if not all((stack, method) in results for stack in stacks):
            continue
        baseline = next((s for s in stacks if s == "reference:fp32"), stacks[0])
        ref_losses = results[(baseline, method)][0]["losses"]
        ours = results[("tunesmith", method)]
        fill_flops(results, stacks, method)
        for stack in stacks:
            runs = results[(stack, method)]
            if runs[0]["flops_per_s"] is not None:
                flops = median_of(runs, "flops_per_s") / 1e9
                mfu = f"{100 * flops / ceilings['bfloat16']:.0f}% | {100 * flops / ceilings['float32']:.0f}%"
            else:
                mfu = " | "
            gap = max(abs(a - b) for run in runs for a, b in zip(run["losses"], ref_losses))
            speed_ratio = median_of(ours, "tokens_per_s") / median_of(runs, "tokens_per_s")
            rss_ratio = median_of(ours, "peak_rss_mb") / median_of(runs, "peak_rss_mb")
            ratios = "| |" if stack == "tunesmith" else f"| {speed_ratio:.2f}× | {rss_ratio:.2f}× |"
            lines.append(f"| {method} | {stack} | {median_of(runs, 'tokens_per_s'):.0f} | "
                         f"{median_of(runs, 'peak_rss_mb'):.0f} | {mfu} | {median_of(runs, 'final_loss'):.4f} | {gap:.4f}"
                         f"{'' if gap <= LOSS_TOLERANCE else ' (over tolerance)'} {ratios}")
        if "tunesmith:before" in stacks:  # the A/B: each repeat's pair ran back to back, under the same load
            pairs = zip(ours, results[("tunesmith:before", method)])
            lines.append(f"| {method} | per repeat tunesmith / tunesmith:before | " + ", ".join(
                f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}× at {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}× RSS"
                for a, b in pairs) + " | | | | | | | |")
        references = [s for s in stacks if s.startswith("reference:")]
        if not references:
            continue
        fastest = max(references, key=lambda s: median_of(results[(s, method)], "tokens_per_s"))
        ref = results[(fastest, method)]
        lines.append(f"| {method} | **tunesmith / fastest reference ({fastest})** | "
                     f"**{median_of(ours, 'tokens_per_s') / median_of(ref, 'tokens_per_s'):.2f}×** "
                     f"| **{median_of(ours, 'peak_rss_mb') / median_of(ref, 'peak_rss_mb'):.2f}×** | | | | | | |")
        if ref[0]["flops_per_s"] is not None:
            needed = 3 * median_of(ref, "flops_per_s") / 1e9
            lines.append(f"| {method} | 3× {fastest} would need | {3 * median_of(ref, 'tokens_per_s'):.0f} | | "
                         f"{100 * needed / ceilings['bfloat16']:.0f}% | | | | | |")
        per_repeat = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, ref)]
        lines.append(f"| {method} | per repeat vs {fastest} | " + ", ".join(f"{r:.2f}×" for r in per_repeat)
                     + " | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and short examples")
    parser.add_argument("--model", default="S", choices=("S", "XS", "smollm2"),
                        help="generated model S or XS, or SmolLM2-135M-Instruct on the alpaca demo set through "
                        "`tunesmith train`")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration (medians reported)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--references", default="fp32,bf16,bf16-flat",
                        help=f"comma-separated reference configurations: {', '.join(REFERENCES)}; '' for "
                        "none (an A/B of --speed against --before-speed alone)")
    parser.add_argument("--speed", default="{}", help="tunesmith's train.speed as JSON (default: its defaults)")
    parser.add_argument("--before-speed", default=None,
                        help="also run tunesmith with this train.speed (JSON) as stack tunesmith:before, in the same "
                        "repeats, and profile it too: a before/after measured in one run")
    parser.add_argument("--before-src", default=None,
                        help="the \"before\" configuration runs this src folder (e.g. ../main/src) instead of this "
                             "checkout's: a change without a lever against the code before it, in one run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's)")
    parser.add_argument("--reference-policy", choices=("tunesmith", "torch"), default="tunesmith",
                        help="the reference's OpenMP wait policy: tunesmith's (the default, so that only the "
                        "stacks differ) or torch's own")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the torch.profiler run of tunesmith's step (op shares, non-matmul share)")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps profiled after one warm-up step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="S", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    size = "quick" if args.quick else args.model
    stacks = [f"reference:{name}" for name in args.references.split(",") if name] + ["tunesmith"]
    speeds = {"tunesmith": json.loads(args.speed)}
    if args.before_speed is not None or args.before_src:
        stacks.insert(-1, "tunesmith:before")
        speeds["tunesmith:before"] = json.loads(args.before_speed or args.speed)
    shape = MODELS.get(size, "SmolLM2-135M-Instruct, alpaca_en_demo.json, max_length 512")
    print(f"model {size}: {shape}; batch {BATCH}; {args.steps} steps; {args.repeats} repeats; "
          f"tunesmith train.speed = {args.speed}; {torch.get_num_threads()} threads; "
          f"reference wait policy: {args.reference_policy}'s; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    from tunesmith.core.runtime import cpu_description

    print(f"CPU: {cpu_description()}", flush=True)
    if size == "smollm2":
        from tunesmith.core.runtime import cache_dir
        from tunesmith.models.smollm2 import ensure_smollm2_folder

        ensure_smollm2_folder(cache_dir())  # convert once, outside every timed run
    ceilings = {"float32": matmul_ceiling(torch.float32), "bfloat16": matmul_ceiling(torch.bfloat16)}
    results: dict = {}
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            for stack in stacks:
                run = run_configuration(size, stack, method, args.steps, speeds.get(stack, speeds["tunesmith"]),
                                        args.threads, args.reference_policy,
                                        args.before_src if stack == "tunesmith:before" else None)
                results.setdefault((stack, method), []).append(run)
                print(f"repeat {repeat + 1} {method:4} {stack:19}: {run['tokens_per_s']:7.0f} tokens/s, "
                      f"{run['peak_rss_mb']:6.0f} MB, final loss {run['final_loss']:.4f}, "
                      f"load {os.getloadavg()[0]:.1f} {' / '.join(run.get('notes', []))}", flush=True)
    print()
    print(report(results, ceilings, stacks))
    if not args.no_profile:
        print()
        profiles = {method: run_profile(size, method, args.profile_steps, args.speed, args.threads)
                    for method in args.methods.split(",")}
        if args.before_speed is not None:
            profiles |= {f"{method} (before)": run_profile(size, method, args.profile_steps, args.before_speed,
                                                           args.threads) for method in args.methods.split(",")}
        print(profile_report(profiles))


def run_profile(size: str, method: str, steps: int, speed: str, threads) -> dict:
    """:func:`profile_step` in its own process, under tunesmith's thread policy."""
    env = stack_environment("tunesmith", "tunesmith")
    command = [sys.executable, __file__, "--worker", "--profile", "--size", size, "--stack", "tunesmith",
               "--method", method, "--steps", str(steps), "--speed", speed] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"profile of {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
