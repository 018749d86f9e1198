"""Writing a plain (merged) model as a GGUF file for llama.cpp-family runtimes, with the ``gguf`` package.

Follows what llama.cpp's ``convert_hf_to_gguf.py`` does for the Llama family (``LlamaModel``):
the same metadata keys, tensor names from ``gguf.get_tensor_name_map``, the rotary permutation of
the query and key weights, 1-D tensors kept in float32, and a float16 fallback for a matrix whose
rows do not split into quantisation blocks. We write it ourselves rather than calling the script
because it is not part of the ``gguf`` package on PyPI and needs a llama.cpp checkout.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.export.check import PROBE_CONVERSATIONS, TOLERANCES, check_hf_model, probe_conversation
from tunesmith.export.convert import convert_with_llama_cpp, converter_unavailable
from tunesmith.export.llama_cpp import check_with_llama_cpp
from tunesmith.export.ollama import write_modelfile

QUANTISATIONS = ("f16", "q8_0", "q4_0")
# The architectures this writer knows, by the ``model_type`` of their Hugging Face config.
SUPPORTED_MODEL_TYPES = ("llama",)
# The families llama.cpp's own converter writes for us (export/convert.py), each tested in
# tests/test_families.py (docs/families.md): f16 and q8_0.
CONVERTER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2",
                         "granite")
# Pre-tokenisers llama.cpp names, by the shape of a Hugging Face byte-level pre-tokenizer.
BYTE_LEVEL_PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}
# ... and by the regex of a Split before a ByteLevel without its own regex (transformers 5 gives a
# tokenizer of model_type qwen2 Qwen2's split, whatever tokenizer.json said), as llama-vocab.cpp writes them.
SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def uses_own_writer(config) -> bool:
    """Plain Llama (default rotary) is written by this module; every other family by llama.cpp's converter."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES and rope.get("rope_type", "default") == "default"


def check_architecture(config, quantize: str = "f16") -> None:
    """Refuse, by name and before anything is written, a model no GGUF path knows.

    Raises:
        TunesmithError: For another architecture, q4_0 where only the converter applies, or a missing converter.
    """

    model_type = getattr(config, "model_type", None)
    if uses_own_writer(config):
        return
    if model_type not in CONVERTER_MODEL_TYPES:
        raise TunesmithError(f"the GGUF export knows the {', '.join(CONVERTER_MODEL_TYPES)} families, not "
                             f"'{model_type}' ({', '.join(getattr(config, 'architectures', None) or [])}); export "
                             "with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    if quantize == "q4_0":
        raise TunesmithError(f"--quantize q4_0 is written for plain Llama only; for '{model_type}' choose --quantize "
                             "q8_0 or f16 (llama.cpp's llama-quantize makes q4_0 from the f16 file)")
    reason = converter_unavailable()
    if reason is not None:
        raise TunesmithError(f"the GGUF export of '{model_type}' runs llama.cpp's convert_hf_to_gguf.py: {reason}")


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, quantize: str, name: str, end_of_turn_id: int) -> None:
    """Write ``model`` (plain Llama weights) and ``tokenizer`` (with its chat template) to ``path``.

    Args:
        quantize: ``f16``, ``q8_0`` or ``q4_0`` for the matrices (1-D tensors stay float32).
        name: ``general.name`` in the metadata.
        end_of_turn_id: The token that ends an assistant turn; runtimes stop generating at it.
    """
    import gguf

    config = model.config
    if not uses_own_writer(config):
        raise TunesmithError(f"the GGUF writer knows plain Llama, not '{config.model_type}'; use export_gguf")
    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    write_hyperparameters(writer, config, quantize)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)  # the gguf package reads merges and special tokens from files
        special = write_vocabulary(writer, tokenizer, Path(folder), config.vocab_size)
    writer.add_eot_token_id(end_of_turn_id)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    for gguf_name, data, qtype in gguf_tensors(model, quantize):
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_hyperparameters(writer, config, quantize: str) -> None:
    """The ``llama.*`` keys, as ``TextModel.set_gguf_parameters`` + ``LlamaModel`` write them."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[quantize])


def write_vocabulary(writer, tokenizer, folder: Path, vocab_size: int):
    """Tokens, types, scores/merges and special ids: ``llama`` (sentencepiece-style) or ``gpt2`` (byte-level).

    Returns:
        The ``gguf.SpecialVocab`` written (special ids, merges, and the chat template it found).

    Raises:
        TunesmithError: For a tokenizer of another kind (named), before any tensor is written.
    """
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text())
    model_type = spec["model"]["type"]
    tokens, types = token_table(tokenizer, vocab_size)
    if model_type == "BPE" and spec["model"].get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(adds_space_prefix_after_special(spec))
        # sentencepiece orders a BPE vocabulary by merge priority: score = -id keeps that order
        writer.add_token_scores([0.0 if kind != gguf.TokenType.NORMAL else -float(i) for i, kind in enumerate(types)])
    elif model_type == "BPE":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(byte_level_pre_tokenizer(spec.get("pre_tokenizer")))
    else:
        raise TunesmithError(f"the GGUF writer handles BPE tokenizers (sentencepiece-style or byte-level), not "
                             f"'{model_type}'; export with --format hf")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return special  # its chat_template is what it found in the saved tokenizer files


def adds_space_prefix_after_special(spec: dict) -> bool:
    """``tokenizer.ggml.add_space_prefix`` for a sentencepiece-style tokenizer.json.

    llama.cpp prefixes a space to the text at the start *and after every special token* when the
    key is true. Hugging Face's ``Metaspace`` with ``prepend_scheme: first`` (stories260k, Llama 2
    tokenizers saved with ``legacy: false``) prefixes only the very start of the text, so after the
    ``<s>`` a chat template begins with it adds none: false matches every prompt a chat template
    renders, which begin with a special token (found by llama.cpp tokenising the probe prompts with
    one ``▁`` too many, in tests/test_export.py). ``always`` and a ``Prepend`` normalizer (the legacy
    form) prefix everywhere: true.
    """
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    for part in parts:
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") == "always"
    normalizers = (spec.get("normalizer") or {})
    normalizers = normalizers.get("normalizers", [normalizers])
    return any(n.get("type") == "Prepend" for n in normalizers)


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type (as ``get_vocab_base`` in convert_hf_to_gguf.py)."""
    import gguf

    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def byte_level_pre_tokenizer(spec) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (how text is split before the merges).

    Raises:
        TunesmithError: For a split the writer cannot name (llama.cpp would tokenise differently).
    """
    parts = spec.get("pretokenizers", [spec]) if spec else []
    shape = tuple(part["type"] for part in parts)
    if shape not in BYTE_LEVEL_PRE_TOKENIZERS or (shape[0] == "Digits" and not parts[0].get("individual_digits")):
        raise TunesmithError(f"the GGUF writer does not know the pre-tokenizer {'+'.join(shape) or 'none'} of this "
                             "tokenizer; export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    return BYTE_LEVEL_PRE_TOKENIZERS[shape]


def converter_pre_tokenizer(spec) -> str | None:
    """llama.cpp's name for a tokenizer.json's byte-level split, for the converter; None where we know none."""
    parts = spec.get("pretokenizers", [spec]) if spec else []
    shape = tuple(part["type"] for part in parts)
    if shape == ("Split", "ByteLevel") and not parts[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get(parts[0].get("pattern", {}).get("Regex"))
    return BYTE_LEVEL_PRE_TOKENIZERS.get(shape)


def gguf_tensors(model: torch.nn.Module, quantize: str):
    """``(gguf name, data, GGML type)`` for every weight, with Llama's rotary permutation of q and k."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunesmithError(f"the GGUF writer has no name for the tensor {hf_name}; export with --format hf")
        data = tensor.detach().float().cpu()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads, config.num_key_value_heads)
        yield gguf_name, *encode_tensor(data.numpy(), gguf_name, quantize)


def permute_rotary(weights: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """``LlamaModel.permute`` of convert_hf_to_gguf.py: HF's half-split rotary layout to llama.cpp's interleaved one."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def encode_tensor(data: np.ndarray, gguf_name: str, quantize: str):
    """The tensor in its GGML type: 1-D float32; matrices as asked (q4_0 keeps embeddings and output at q8_0)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if data.ndim == 1:
        return data.astype(np.float32), Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quantize]
    if qtype == Q.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0  # as llama-quantize does: the embedding and output matrices lose the most at 4 bits
    if qtype != Q.F16 and data.shape[-1] % 32 != 0:
        qtype = Q.F16  # rows that do not split into 32-value blocks stay float16, as convert_hf_to_gguf.py does
    return quants.quantize(data, qtype), qtype


def export_gguf(plain, tokenizer, probe, partial: Path, quantize: str, ollama: bool, name: str):
    """Write ``model-<quantize>.gguf`` (and a Modelfile), reload it with transformers and llama.cpp, compare.

    The llama.cpp check (:mod:`tunesmith.export.llama_cpp`) is skipped, with the reason, where
    node-llama-cpp is not installed.

    Returns:
        ``(files, checks by loader, skipped loaders with the reason, transformers load seconds)``.
    """
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer


    partial.mkdir(parents=True, exist_ok=True)
    path = partial / f"model-{quantize}.gguf"
    if uses_own_writer(plain.config):
        write_gguf(plain, tokenizer, path, quantize, name, probe.end_of_turn_id)
    else:
        convert_family(plain, tokenizer, path, quantize, probe.end_of_turn_id)
    files = [path]
    if ollama:
        files.append(write_modelfile(partial, path.name, tokenizer, probe.end_of_turn_id))
    started = time.perf_counter()
    checks, skipped = {}, {}
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(partial, gguf_file=path.name, dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(partial, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
        if uses_own_writer(plain.config):
            raise
        # transformers reads GGUF for some families only; llama.cpp, the runtime that matters, still checks it
        reloaded = None
        skipped["transformers"] = f"transformers cannot load a GGUF '{plain.config.model_type}' model ({error})"
    seconds = time.perf_counter() - started
    if reloaded is not None:
        gguf_tokenizer.chat_template = gguf_tokenizer.chat_template or tokenizer.chat_template

        def tokenize(index: int) -> list[int]:

            conversation = probe_conversation(gguf_tokenizer, PROBE_CONVERSATIONS[index])
            text = gguf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            return gguf_tokenizer(text, add_special_tokens=False)["input_ids"]

        check = check_hf_model(probe, reloaded.to(next(plain.parameters()).device), TOLERANCES[quantize], tokenize)
        checks["transformers"] = dataclasses.replace(check, load_seconds=seconds)
    outcome = check_with_llama_cpp(path, probe, TOLERANCES[quantize])
    if isinstance(outcome, str):
        skipped["llama.cpp"] = outcome
    else:
        checks["llama.cpp"] = outcome
    if not checks:
        raise TunesmithError(f"no loader could check {path.name} ({'; '.join(skipped.values())}); nothing was kept")
    reader = checks.get("transformers")
    if "llama.cpp" in checks and reader is not None and not reader.passed and not uses_own_writer(plain.config):
        # transformers' GGUF reader rebuilds some families only in part (Llama 3's rotary scaling, Gemma 3's
        # local layers): llama.cpp, the runtime the file is for, is the check that decides for converted files
        del checks["transformers"]
        skipped["transformers"] = f"its GGUF reader differs from the trained model here ({reader.describe()})"
    return tuple(files), checks, skipped, seconds


def convert_family(plain, tokenizer, path: Path, quantize: str, end_of_turn_id: int) -> None:
    """Any family but plain Llama: save a Hugging Face folder beside ``path``, convert it with llama.cpp's converter.

    The end-of-turn token is written as the generation's stop (``generation_config.json``'s eos, which
    the converter reads), so runtimes stop where the chat template ends a reply.
    """

    with tempfile.TemporaryDirectory(prefix="tunesmith-gguf-", dir=path.parent.parent) as folder:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        spec = json.loads((Path(folder) / "tokenizer.json").read_text())
        generation = Path(folder) / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.is_file() else {}
        stops = settings.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        settings["eos_token_id"] = [end_of_turn_id, *[stop for stop in stops if stop != end_of_turn_id]]
        generation.write_text(json.dumps(settings))
        convert_with_llama_cpp(Path(folder), path, quantize, converter_pre_tokenizer(spec.get("pre_tokenizer")))
