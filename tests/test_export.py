"""``tunesmith export``: hf, peft and GGUF exports that check themselves, and what they refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.core.errors import TunesmithError

from conftest import REPO, build_tiny_llama, run_cli


def _train(out: Path, model: str) -> Path:
    """A real 6-step LoRA run on ``model`` (run folder with adapter/, manifest and tokenizer)."""
    from tunesmith.config import validate_recipe
    from tunesmith.pipeline.finetune import finetune

    recipe = validate_recipe({
        "model": {"name": model},
        "data": {"train": str(REPO / "examples" / "data" / "tiny" / "train.jsonl"), "max_length": 96,
                 "template": "simple"},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "log_every": 1, "seed": 0},
        "output": {"dir": str(out)},
    })
    finetune(recipe, progress=False)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama) -> Path:
    """The run on the tests' tiny Llama (byte-level BPE tokenizer): what every format must reproduce."""
    return _train(tmp_path_factory.mktemp("export") / "run", tiny_llama)


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory) -> str:
    """A random Llama with a SentencePiece tokenizer and peaked distributions (see conftest.build_tiny_llama)."""
    folder = tmp_path_factory.mktemp("export") / "sentencepiece-llama"
    return str(build_tiny_llama(folder, tokenizer="sentencepiece", init_std=0.1))


@pytest.fixture(scope="module")
def sentencepiece_run(tmp_path_factory, sentencepiece_llama) -> Path:
    """A run on a SentencePiece Llama, for the GGUF tests that need that tokenizer (the ``llama`` tokenizer
    model and ``add_space_prefix`` in the metadata) and peaked distributions (llama.cpp's agreement with
    transformers in f16, calibrated on stories260k and passed by the same checks on this model)."""
    return _train(tmp_path_factory.mktemp("export") / "sentencepiece-run", sentencepiece_llama)


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory) -> Path:
    """The run on stories260k, for llama.cpp's q4_0 agreement: its export must pass the transformers check,
    which needs a trained model's margins between the likeliest tokens (a random model's near-ties flip under
    4-bit weights: at init 0.1 the top token agreed at 46% of positions, below the 50% tolerance; at init 0.2
    the KL divergence went past 0.5 nats)."""
    from conftest import asset

    return _train(tmp_path_factory.mktemp("export") / "stories-run", str(asset("models/stories260k")))


@pytest.mark.parametrize("fmt,quantize", [("hf", None), ("peft", None), ("gguf", "f16"), ("gguf", "q8_0")])
def test_every_format_reloads_and_matches_the_trained_model(trained_run: Path, tmp_path: Path, fmt, quantize) -> None:
    from tunesmith.export import export
    from tunesmith.export.check import TOLERANCES

    report = export(trained_run, tmp_path / "out", fmt, quantize)
    check = report.checks["peft" if fmt == "peft" else "transformers"]
    tolerance = TOLERANCES[quantize or fmt]
    assert check.passed and check.tolerance == tolerance
    assert check.kl_divergence <= tolerance.kl_divergence and check.top1_agreement >= tolerance.top1_agreement
    assert check.tokenizer_matches is (True if fmt == "gguf" else None)
    if fmt in ("hf", "peft"):
        assert check.max_logit_difference < 1e-4 and check.reply_agreement == 1.0
    assert not (tmp_path / ".out.partial").exists()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    if fmt == "hf":
        assert "model.safetensors" in names and "adapter_config.json" not in names
    elif fmt == "peft":
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(tmp_path / "out").peft_type.value == "LORA"
    else:
        assert names == ["README.md", f"model-{quantize}.gguf"]  # the model card every export of a run carries


def _llama_cpp_or_skip() -> None:
    from tunesmith.export.llama_cpp import llama_cpp_unavailable

    reason = llama_cpp_unavailable()
    if reason is not None:
        pytest.skip(f"the optional llama.cpp check cannot run: {reason}")


@pytest.mark.parametrize("quantize", ["f16", "q4_0"])
def test_llama_cpp_reads_the_gguf_export_as_the_trained_model(request, tmp_path: Path, quantize) -> None:
    from tunesmith.export import export
    from tunesmith.export.check import TOLERANCES

    _llama_cpp_or_skip()
    run = request.getfixturevalue("sentencepiece_run" if quantize == "f16" else "stories_run")
    report = export(run, tmp_path / "out", "gguf", quantize)
    check = report.checks["llama.cpp"]
    assert check.passed and check.tolerance == TOLERANCES[quantize] and "llama.cpp" not in report.skipped
    assert check.tokenizer_matches is True  # llama.cpp's own tokeniser, from the file's metadata
    assert check.load_seconds > 0 and check.reply_agreement > 0
    transformers = report.checks["transformers"]
    if quantize == "f16":  # llama.cpp computes in its own kernels: close to, not equal to, transformers
        assert check.max_logit_difference < 0.1 and check.kl_divergence < 1e-4 and check.top1_agreement >= 0.97
    else:  # both read the same q4_0 blocks, so they agree with each other far better than with the float model
        assert abs(check.kl_divergence - transformers.kl_divergence) < 0.2 * transformers.kl_divergence


def test_without_node_llama_cpp_the_export_says_why_llama_cpp_was_not_run(trained_run: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    from tunesmith.export import export

    monkeypatch.setenv("TUNESMITH_NODE_LLAMA_CPP", str(tmp_path / "nothing-here"))
    report = export(trained_run, tmp_path / "out", "gguf", "f16")
    assert set(report.checks) == {"transformers"}
    assert report.skipped["llama.cpp"].startswith(f"node-llama-cpp is not installed in {tmp_path / 'nothing-here'}")
    assert "llama.cpp: not checked (node-llama-cpp is not installed" in report.describe()


def test_a_gguf_file_llama_cpp_cannot_load_is_an_error(tmp_path: Path) -> None:
    from tunesmith.export.llama_cpp import run_llama_cpp

    _llama_cpp_or_skip()
    broken = tmp_path / "model-f16.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))  # a header and nothing after it
    with pytest.raises(TunesmithError, match="llama.cpp could not load or evaluate model-f16.gguf"):
        run_llama_cpp(broken, [[1, 2, 3]], ["abc"], [4])


def test_gguf_metadata_names_llama_tensors_chat_template_and_end_of_turn(sentencepiece_run: Path,
                                                                        tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    from tunesmith.export import export
    from tunesmith.inference.results import load_result

    export(sentencepiece_run, tmp_path / "out", "gguf", "q8_0", ollama=True)
    reader = GGUFReader(tmp_path / "out" / "model-q8_0.gguf")

    def field(key):
        value = reader.fields[key]
        return value.contents()

    tokenizer = load_result(sentencepiece_run).tokenizer
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 5 and field("llama.attention.head_count_kv") == 4
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.eos_token_id  # the simple template ends turns with EOS
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.tokens")) == 512
    assert field("tokenizer.ggml.add_space_prefix") is False  # Metaspace prepend_scheme "first": none after <s>
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert len(types) == 1 + 5 * 9 + 2  # embeddings, 9 per block, final norm, output
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["blk.0.attn_norm.weight"] == Q.F32
    assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 172 do not split into 32-value blocks
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "</s>"' in modelfile


def test_a_quantisation_beyond_its_tolerance_says_by_how_much_and_leaves_nothing(tmp_path: Path) -> None:
    from test_methods_cli import _trained_result
    from tunesmith.export import export

    # random perturbations of every LoRA weight make a model that 4-bit weights cannot follow; the measure needs
    # peaked distributions (a trained model's, or a wide random init's: at 0.02, flat ones stay within 0.5 nats)
    model = str(build_tiny_llama(tmp_path / "model", tokenizer="sentencepiece", init_std=0.2))
    result = _trained_result({"kind": "lora", "r": 4}, model, tmp_path / "adapter")
    with pytest.raises(TunesmithError, match=r"KL divergence of [0-9.]+ nats, [0-9.]+x the tolerance of 0.5"):
        export(result, tmp_path / "out", "gguf", "q4_0")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_an_architecture_the_gguf_writer_does_not_know_is_refused_by_name_before_writing(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.export import export

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TunesmithError, match="not 'gpt2' \\(GPT2LMHeadModel\\)"):
        export(tmp_path / "gpt2", tmp_path / "out", "gguf")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_an_unmergeable_method_to_gguf_says_why_and_suggests_peft(tiny_llama: str, tmp_path: Path) -> None:
    from test_methods_cli import _trained_result
    from tunesmith.export import export
    from tunesmith.methods import NotMergeable

    result = _trained_result({"kind": "prefix", "virtual_tokens": 4}, tiny_llama, tmp_path / "adapter")
    with pytest.raises(NotMergeable, match="^prefix tuning adds keys and values.*--format peft"):
        export(result, tmp_path / "out", "gguf")
    assert not (tmp_path / "out").exists()
    report = export(result, tmp_path / "out", "peft")  # and plain peft loads it with the same logits
    assert report.checks["peft"].max_logit_difference < 1e-4


@pytest.mark.parametrize("template", ["chatml", "simple", "alpaca"])
def test_the_ollama_template_renders_conversations_as_the_chat_template(tiny_llama: str, template: str) -> None:
    from transformers import AutoTokenizer

    from tunesmith.data.templates import resolve_template
    from tunesmith.export.ollama import go_template, render_with_pieces, role_pieces

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    resolve_template(tokenizer, template)
    pieces = role_pieces(tokenizer)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert render_with_pieces(pieces, conversation) == expected
    go = go_template(pieces)
    assert go.count("{{ end }}") == 2 and '{{ if eq .Role "system" }}' in go


def test_export_command_new_and_old_flags(trained_run: Path, tmp_path: Path, capsys) -> None:
    from tunesmith.cli import main

    new = run_cli("export", str(trained_run), "--format", "gguf", "--quantize", "q8_0", "--out", str(tmp_path / "g"))
    assert new.returncode == 0, new.stderr
    assert "exported lora result as gguf q8_0" in new.stdout and "transformers: max |logit difference|" in new.stdout
    assert main(["export", "--adapter", str(trained_run / "adapter"), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(tmp_path / "m")]) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.heavy  # about a minute on a quiet machine (transformers dequantises the GGUF in Python)
def test_smollm2_gguf_replies_stop_at_im_end(tmp_path: Path) -> None:
    from tunesmith.export import export

    report = export(_smollm2_folder(), tmp_path / "out", "gguf", "q8_0")
    check = report.checks["transformers"]
    assert check.passed and check.reference_stops and check.stops and check.tokenizer_matches


@pytest.mark.slow  # SmolLM2 written as f16 GGUF and run by llama.cpp; the slow transformers GGUF reload is skipped
def test_llama_cpp_replies_from_a_smollm2_gguf_stop_at_im_end(tmp_path: Path) -> None:
    from tunesmith.export.check import TOLERANCES, probe_reference
    from tunesmith.export.gguf import write_gguf
    from tunesmith.export.llama_cpp import check_with_llama_cpp
    from tunesmith.inference.results import load_result

    _llama_cpp_or_skip()
    loaded = load_result(_smollm2_folder())
    probe = probe_reference(loaded.model, loaded.tokenizer)
    path = tmp_path / "model-f16.gguf"
    write_gguf(loaded.model, loaded.tokenizer, path, "f16", "smollm2", probe.end_of_turn_id)
    check = check_with_llama_cpp(path, probe, TOLERANCES["f16"])
    assert probe.end_of_turn_id == loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert check.passed and check.tokenizer_matches  # byte-level BPE with the smollm pre-tokenizer
    assert check.reference_stops and check.stops  # llama.cpp stops at <|im_end|> by the file's own metadata


def _smollm2_folder() -> str:
    from tunesmith.core.runtime import cache_dir
    from tunesmith.models import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m-instruct", cache_dir())
    except TunesmithError as error:
        pytest.skip(f"SmolLM2 is not installed: {error}")
