"""Loading a causal language model and its tokenizer: by alias, hub id or local folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from tunesmith.config import ModelSection
from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import did_you_mean
from tunesmith.core.runtime import bitsandbytes_kept_out
from tunesmith.models.aliases import ALIASES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name: str, cache: Path) -> str:
    """Turn an alias, a local folder or a hub id into what ``from_pretrained`` takes.

    Raises:
        TunesmithError: For a local folder without weights, or a bare name that is neither an
            alias nor a folder (hub ids have the form owner/name).
    """
    if name in ALIASES:
        return str(ALIASES.get(name).materialise(cache))
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
            raise TunesmithError(
                f"model folder {path} has no weights (*.safetensors or *.bin); point model.name at a "
                "folder written by save_pretrained"
            )
        return str(path)
    if path.exists():
        raise TunesmithError(f"model.name {name} is a file; give the folder that holds it")
    if "/" not in name and "\\" not in name:
        hint = did_you_mean(name, ALIASES.names())
        raise TunesmithError(
            f"unknown model alias '{name}'.{hint} Built-in aliases: {', '.join(ALIASES.names())}; "
            "otherwise give a hub id (owner/name) or a local folder"
        )
    if not looks_like_hub_id(name):
        raise TunesmithError(f"model folder {path} does not exist; check the path (it is not a hub id of the form owner/name)")
    return name


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` as the Hugging Face hub spells repository ids (not ``./x``, ``/a/b`` or ``a/b/c``)."""
    return bool(HUB_ID.fullmatch(name)) and not name.startswith((".", "~"))


def check_weight_files(folder: Path) -> None:
    """Refuse an empty or truncated ``*.safetensors`` before transformers reads it.

    A safetensors file is an 8-byte header length, a JSON header and the tensor bytes the header's
    offsets cover; a file shorter than that was cut off while copying or downloading.

    Raises:
        TunesmithError: Naming the file, its size and the size its header promises.
    """
    for weights in sorted(Path(folder).glob("*.safetensors")):
        size = weights.stat().st_size
        with open(weights, "rb") as handle:
            head = handle.read(8)
            header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = handle.read(header_size) if 0 < header_size <= min(size, 100_000_000) else b""
        try:
            entries = json.loads(header.decode("utf-8")) if header else None
            end = max((entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            entries = None
        if entries is None:
            raise TunesmithError(f"{weights} is not a complete safetensors file ({size} bytes, no readable header); "
                                 "copy or download the model again")
        if size < 8 + header_size + end:
            raise TunesmithError(f"{weights} is truncated: {size} bytes, its header promises {8 + header_size + end}; "
                                 "copy or download the model again")


def load_tokenizer(path: str, section: ModelSection):
    """The tokenizer, with a padding token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path, section)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def is_encoder(config) -> bool:
    """Whether a transformers config is an encoder-only model (BERT, RoBERTa, MiniLM, ...), not a causal LM.

    transformers has a masked-LM class for its type, and it is neither an encoder-decoder nor set up
    as a decoder (BERT can be either; its ``is_decoder`` says which).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False))


def load_model(path: str, section: ModelSection, device: torch.device | str = "cpu"):
    """The model in the recipe's dtype, on ``device``, in training mode off (eval).

    A causal LM (``AutoModelForCausalLM``), or for an encoder-only folder (:func:`is_encoder`) the
    bare encoder (``AutoModel``, final hidden states, no head), which stage cls puts a label head on.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if Path(path).is_dir():
        check_weight_files(Path(path))
    config = _from_pretrained(AutoConfig, path, section)
    apply_rope_scaling(config, section)
    encoder = is_encoder(config)
    factory = AutoModel if encoder else AutoModelForCausalLM
    if section.quantize != "none":
        # bitsandbytes quantises each linear layer as it streams in; its layers live where they were loaded.
        model = _from_pretrained(factory, path, section, config=config, dtype=DTYPES[section.dtype],
                                 quantization_config=quantization_config(section), device_map={"": str(device)})
        keep_trainable_layout(model)
        return model.eval()
    model = _from_pretrained(factory, path, section, config=config, dtype=DTYPES[section.dtype])
    if encoder and getattr(model, "pooler", None) is not None:
        # The label head pools the final hidden states itself; BERT's pooler would be weights that never get a
        # gradient (DDP refuses those) and a LoRA target that never trains.
        model.pooler = None
    return model.to(device).eval()


def load_dequantised(path: str, section: ModelSection, trained_over: dict, device: torch.device | str = "cpu"):
    """The base an adapter was trained over when its run had ``model.quantize``: quantised as in that run, then
    dequantised into ``section.dtype``.

    A QLoRA adapter learned against the rounded weights, not the checkpoint's; merged onto these it gives
    exactly the model that trained (a LoftQ adapter even holds the rounding error, and would count it twice
    on the checkpoint's weights). transformers' ``dequantize`` turns each bitsandbytes layer back into an
    ``nn.Linear``.

    Args:
        trained_over: The manifest's ``quantized_base``: ``quantize`` and the ``dtype`` the run loaded in.
    """
    run_section = section.model_copy(update={"quantize": trained_over["quantize"], "dtype": trained_over["dtype"]})
    model = load_model(path, run_section, device).dequantize()
    return model if section.dtype == "auto" else model.to(DTYPES[section.dtype])


def apply_rope_scaling(config, section: ModelSection) -> None:
    """Write ``model.rope_scaling`` into the config's RoPE parameters (transformers reads them as the model builds).

    Raises:
        TunesmithError: For a model without rotary position embeddings.
    """
    scaling = section.rope_scaling
    if scaling is None:
        return
    current = getattr(config, "rope_parameters", None)
    if not isinstance(current, dict):
        raise TunesmithError(f"model.rope_scaling: {section.name} ({getattr(config, 'model_type', '?')}) has no "
                             "rotary position embeddings to scale; drop model.rope_scaling")
    values = {**current, "rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.original_max_position_embeddings is not None:
        values["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    config.rope_parameters = values


def quantization_config(section: ModelSection):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantize`` (nf4: QLoRA's double-quantised 4-bit NormalFloat).

    Raises:
        TunesmithError: When bitsandbytes is not installed.
    """
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401  (transformers would fail later with a longer message)
    except ImportError:
        if bitsandbytes_kept_out():  # a command that said it would quantise nothing did
            raise TunesmithError(f"model.quantize: {section.quantize} in a process that kept bitsandbytes out "
                                 "(tunesmith.core.runtime.keep_bitsandbytes_out); run it as its own command") from None
        raise TunesmithError(f"model.quantize: {section.quantize} needs bitsandbytes; "
                             "pip install 'tunesmith[quantize]' (or drop model.quantize)") from None
    if section.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[section.compute_dtype])


def keep_trainable_layout(model) -> None:
    """Keep bitsandbytes' 4-bit layers in the layout its backward pass understands.

    On a CPU with AVX-512 BF16, bitsandbytes (0.48-0.50) repacks a 4-bit weight for its inference kernel the
    first time the layer runs in eval mode without gradients (evaluation before training), for good; later
    training steps then go through that kernel, which has no backward ("gemv_4bit: an autograd kernel was not
    registered"), and the adapters' gradients come out wrong. The switch is the layer's own attribute.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _from_pretrained(factory, path: str, section: ModelSection, **kwargs):
    try:
        return factory.from_pretrained(
            path, trust_remote_code=section.trust_remote_code, revision=section.revision, **kwargs
        )
    except (OSError, ValueError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not Path(path).exists() and looks_like_hub_id(path):
            raise TunesmithError(
                f"model '{section.name}': there is no local folder {path}, and the Hugging Face hub could not "
                f"give it ({first_line}); check the name, your connection, or give a local folder"
            ) from None
        raise TunesmithError(f"could not load model '{section.name}' from {path}: {first_line}") from None


def load_model_and_tokenizer(section: ModelSection, cache: Path, device: torch.device | str = "cpu"):
    """Resolve ``section.name`` and load both the model and its tokenizer."""
    path = resolve_model_path(section.name, cache)
    return load_model(path, section, device), load_tokenizer(path, section)
