"""Shared fixtures: tiny models and data made in the test session, and the offline assets folder.

Most tests need only *a* small Llama model and *some* instruction data: ``tiny_llama`` (a random
Llama with stories260k's shapes and a byte-level BPE tokenizer, both built deterministically once per
session) and ``tiny_data`` (``tests/data/instructions.json``, written by the project) serve them, so
they run on a fresh clone. Tests that need a *trained* model or real data use ``stories260k`` and
the shared data sets; they find ``../shared/assets`` through one setting, ``TUNESMITH_TEST_ASSETS``
(default: ``../shared/assets`` beside the repository), and skip with a reason where it is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunesmith.core.runtime import gguf_converter_dir, node_llama_cpp_dir
from tunesmith.training.hooks import Hook

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TUNESMITH_TEST_ASSETS", REPO.parent / "shared" / "assets"))
TINY_DATA = REPO / "tests" / "data" / "instructions.json"
# 240 preference pairs in dpo_en_demo's layout, made from instructions.json: the prompt is a record's
# instruction (and input), chosen its output, rejected the output of record (7 i + 11) mod 323.
TINY_PAIRS = REPO / "tests" / "data" / "pairs.json"


def asset(relative: str) -> Path:
    """Path of a file in the assets folder; skips the test when it is missing."""
    path = ASSETS / relative
    if not path.exists():
        pytest.skip(f"test asset {path} is missing (set TUNESMITH_TEST_ASSETS to the shared assets folder)")
    return path


@pytest.fixture
def stories260k() -> str:
    """The tiny real Llama model (292,800 parameters) trained on TinyStories."""
    return str(asset("models/stories260k"))


@pytest.fixture
def alpaca_demo() -> str:
    """999 alpaca-format instruction records."""
    return str(asset("data/llama_factory/alpaca_en_demo.json"))


@pytest.fixture(scope="session")
def tiny_data() -> str:
    """323 alpaca-format English instruction records shipped with the tests (3 planted exact duplicates)."""
    return str(TINY_DATA)


def build_tiny_llama(folder: Path, tokenizer: str = "bpe", init_std: float = 0.02) -> Path:
    """Save a random Llama shaped like stories260k (292,800 parameters) and its tokenizer into ``folder``.

    Deterministic: the weights come from seed 0, the tokenizer of 512 tokens (``<unk>`` = pad, ``<s>``, ``</s>``)
    is trained on ``tests/data/instructions.json`` without a chat template (like stories260k). Golden numbers
    computed on it hold on every machine.

    Args:
        tokenizer: ``bpe``, a byte-level BPE; or ``sentencepiece``, a SentencePiece BPE with byte fallback
            converted by transformers, as Llama 2's and stories260k's were (``Metaspace`` with
            ``prepend_scheme: first``): the GGUF export's ``llama`` tokenizer model.
        init_std: The random weights' standard deviation. At 0.02 (transformers' default) a random model's
            next-token distributions are nearly flat, which no numerical check can tell apart from noise; a
            wider init gives peaked distributions like a trained model's.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    save_tokenizer = {"bpe": _save_byte_level_bpe, "sentencepiece": _save_sentencepiece}[tokenizer]
    rows = json.loads(TINY_DATA.read_text())
    save_tokenizer(folder, [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows])
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=512,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         initializer_range=init_std)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _save_byte_level_bpe(folder: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(folder)


def _save_sentencepiece(folder: Path, texts: list[str]) -> None:
    import io

    import sentencepiece
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=512, byte_fallback=True,
        character_coverage=0.995, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    sentencepiece_folder = folder.parent / f"{folder.name}-sentencepiece"
    sentencepiece_folder.mkdir()
    (sentencepiece_folder / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer.from_pretrained(sentencepiece_folder, legacy=False, add_bos_token=True,
                                   pad_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random (untrained) Llama with stories260k's shapes and a tokenizer, saved once per session."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tunesmith's cache out of the user's home, except the converted SmolLM2 (slow to make).

    The llama.cpp check's npm package stays where the user installed it (their own cache's ``node/``,
    as docs/export.md installs it), so the isolated cache does not hide it.
    """
    if not os.environ.get("TUNESMITH_NODE_LLAMA_CPP"):
        monkeypatch.setenv("TUNESMITH_NODE_LLAMA_CPP", str(node_llama_cpp_dir()))
    if not os.environ.get("TUNESMITH_GGUF_CONVERTER"):  # llama.cpp's converter too (tunesmith.export.convert)
        monkeypatch.setenv("TUNESMITH_GGUF_CONVERTER", str(gguf_converter_dir()))
    monkeypatch.setenv("TUNESMITH_CACHE", os.environ.get("TUNESMITH_TEST_CACHE", str(REPO / ".cache" / "tests")))


@pytest.fixture(autouse=True)
def _bitsandbytes_stays_importable(monkeypatch):
    """A command run inside the test process (``main``, the ``cli`` fixture) must not keep bitsandbytes out of it
    (``keep_bitsandbytes_out`` cannot be undone, and later tests quantise): there it does nothing. The check that
    commands keep it out runs them in their own processes (tests/test_start_imports.py)."""
    monkeypatch.setattr("tunesmith.core.runtime.keep_bitsandbytes_out", lambda: False)


class StopAt(Hook):
    """A training hook that simulates Ctrl-C after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, record: dict) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt


class StartedAt(Hook):
    """A training hook recording the step training started at: 0 for a new run, the checkpoint's step
    for a resume. A resume that silently restarted from step 0 would give the same losses and weights
    (training is deterministic), so exact-resume tests assert this too."""

    step = None

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        self.step = start_step


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600,
            input: str | None = None):
    """Run ``python -m tunesmith ARGS`` with this checkout's sources; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture
def cli(capsys, monkeypatch):
    """``tunesmith ARGS`` run in this process (``tunesmith.cli.main``), as ``run_cli`` runs it in a new one.

    Returns a CompletedProcess (exit status, standard output, standard error). For the checks whose subject is
    not the process boundary: each ``run_cli`` pays a fresh Python's import of torch and transformers (5-10 s
    on two cores), this call nothing. An exception that escapes ``main`` fails the test where the process
    would have printed a traceback. Keep ``run_cli`` for a journey's one real process, for what only a process
    shows (library warnings on the real standard error, signals, exit on a crash), and where the test uses capfd.
    """
    import io
    import subprocess
    import sys

    from tunesmith.cli import main

    def call(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, input: str | None = None):
        import logging

        from transformers.utils import logging as transformers_logging

        capsys.readouterr()  # drop what the test printed before
        saved = dict(os.environ)  # main() sets OpenMP's wait policy in the environment; put it back
        # and quiets libraries for its process: put their logging back too, for the tests that follow
        verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
        bitsandbytes_level = logging.getLogger("bitsandbytes").level
        with monkeypatch.context() as patch:
            if cwd is not None:
                patch.chdir(cwd)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            if input is not None:
                patch.setattr(sys, "stdin", io.StringIO(input))
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code
            finally:
                for name in set(os.environ) - set(saved):
                    del os.environ[name]
                os.environ.update(saved)
                transformers_logging.set_verbosity(verbosity)
                (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
                logging.getLogger("bitsandbytes").setLevel(bitsandbytes_level)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["tunesmith", *args], code, captured.out, captured.err)

    return call


@pytest.fixture
def tiny_recipe(tiny_llama, tiny_data, tmp_path):
    """Factory of a fast recipe on the tiny Llama and the tiny data; overrides as dotted keys."""
    from tunesmith.config import apply_override, validate_recipe

    def make(*overrides: str, output: str = "run"):
        raw = {
            "model": {"name": tiny_llama},
            "data": {"train": tiny_data, "max_length": 96, "template": "simple"},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            # float32: the golden losses and the exact-equality tests (accumulation, DDP, resume) were
            # taken in float32; train.speed.autocast defaults to bfloat16 where the CPU computes it.
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "seed": 0,
                      "speed": {"autocast": "off"}},
            "output": {"dir": str(tmp_path / output)},
        }
        for override in overrides:
            apply_override(raw, override)
        return validate_recipe(raw)

    return make


def pytest_sessionfinish(session, exitstatus):
    """CI's guard (``TUNESMITH_MAX_ASSET_SKIPS=5`` in .ci/run): fail when more tests skip for a missing asset.

    A fresh clone has no ``../shared/assets``; only tests that need a *trained* model may skip there.
    """
    limit = os.environ.get("TUNESMITH_MAX_ASSET_SKIPS")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if limit is None or reporter is None:
        return
    skipped = [report for report in reporter.stats.get("skipped", []) if "test asset" in str(report.longrepr)]
    if len(skipped) > int(limit):
        import sys

        names = ", ".join(report.nodeid for report in skipped[:10])
        print(f"\n{len(skipped)} tests skipped for a missing test asset, more than TUNESMITH_MAX_ASSET_SKIPS={limit}: "
              f"{names}{', ...' if len(skipped) > 10 else ''}; make them build their own tiny model "
              "(the tiny_llama fixture)", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
