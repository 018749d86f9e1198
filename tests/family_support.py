"""Tiny random models of every major open family, each with a tokenizer and its own chat template.

Each family is built from its own transformers config class (no weights downloaded): the shapes are
tiny, but every quirk of the family is on (sliding windows, Gemma's soft-capping and scaled
embeddings, Granite's multipliers, Qwen3's q/k norms and experts, Phi-3's fused projections, OLMo 2's
post-norms, Llama 3's rotary scaling). The tokenizer is one byte-level BPE of 512 tokens trained on
``tests/data/instructions.json`` with every family's special tokens; each family names its own
bos/eos/pad and carries its published chat template (``tests/data/templates/<name>.jinja``, from the
families' ``tokenizer_config.json``, tool-calling branches left out).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "tests" / "data" / "templates"
INSTRUCTIONS = REPO / "tests" / "data" / "instructions.json"

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>", "<|start_of_role|>", "<|end_of_role|>",
    "<|end_of_text|>", "[INST]", "[/INST]",
]
PLAIN_ADDED_TOKENS = ["<think>", "</think>"]  # Qwen3 adds them as ordinary (not special) tokens

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    """One family: its config class and quirks, tokens and chat template."""

    name: str
    config_class: str
    template: str
    bos: str | None
    eos: str
    pad: str
    config: dict = field(default_factory=dict)
    thinking: bool = False

    def build_config(self, tokenizer):
        import transformers

        ids = {f"{kind}_token_id": tokenizer.convert_tokens_to_ids(token) if token else None
               for kind, token in (("bos", self.bos), ("eos", self.eos), ("pad", self.pad))}
        return getattr(transformers, self.config_class)(**{**COMMON, **ids, **self.config})


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
FAMILIES = {
    family.name: family for family in (
        Family("llama2", "LlamaConfig", "llama2", "<s>", "</s>", "<unk>"),
        Family("llama3", "LlamaConfig", "llama3", "<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>",
               {"rope_parameters": LLAMA3_ROPE}),
        Family("qwen2", "Qwen2Config", "qwen2", None, "<|im_end|>", "<|endoftext|>"),
        Family("qwen3", "Qwen3Config", "qwen3", None, "<|im_end|>", "<|endoftext|>", {"head_dim": 16}, thinking=True),
        Family("qwen3_moe", "Qwen3MoeConfig", "qwen3", None, "<|im_end|>", "<|endoftext|>",
               {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "norm_topk_prob": True},  # as Qwen3-30B-A3B's config (llama.cpp always normalises the top-k)
               thinking=True),
        # Gemma: scaled embeddings are built in; soft-capping on; a sliding window shorter than the examples
        Family("gemma2", "Gemma2Config", "gemma2", "<bos>", "<eos>", "<pad>",
               {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "query_pre_attn_scalar": 16, "tie_word_embeddings": True}),
        Family("gemma3", "Gemma3TextConfig", "gemma3", "<bos>", "<eos>", "<pad>",
               {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16, "tie_word_embeddings": True,
                "layer_types": ["sliding_attention", "full_attention"]}),
        Family("mistral", "MistralConfig", "mistral", "<s>", "</s>", "<unk>", {"sliding_window": 8}),
        Family("phi3", "Phi3Config", "phi3", "<s>", "<|endoftext|>", "<|endoftext|>"),
        Family("olmo2", "Olmo2Config", "olmo2", "<|endoftext|>", "<|endoftext|>", "<|pad|>"),
        Family("granite", "GraniteConfig", "granite", "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>",
               {"embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.0625}),
    )
}


def build_tokenizer():
    """The shared byte-level BPE (512 tokens, every family's special tokens), deterministic."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(trained_bpe()))


@functools.cache
def trained_bpe() -> str:
    """The BPE trained once per session, as its JSON."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = json.loads(INSTRUCTIONS.read_text())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512 - len(PLAIN_ADDED_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows], trainer)
    bpe.add_tokens([AddedToken(token, special=False, normalized=False) for token in PLAIN_ADDED_TOKENS])
    return bpe.to_str()


def build_family(name: str, folder: Path, seed: int = 0, family: Family | None = None) -> Path:
    """Save a random model of family ``name`` (or of ``family``, a variant of it) with its tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM

    family = family or FAMILIES[name]
    tokenizer = build_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = family.bos, family.eos, family.pad
    tokenizer.chat_template = (TEMPLATES / f"{family.template}.jinja").read_text()
    tokenizer.save_pretrained(folder)
    config = family.build_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # random weights large enough that the families' differences show in the logits
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder
