"""What prefix, prompt and P-tuning share: peft trains virtual tokens, tunesmith generates with them.

peft's own ``generate`` for these methods gives different tokens from a step-by-step greedy loop
over its ``forward`` with transformers 5 (prefixes ignored, prompts misplaced after the first
tokens). :class:`VirtualTokenModel` keeps peft's training forward and generates through the base
model's ``generate`` with the virtual tokens passed in the ordinary way: the prefix as a pre-filled
key/value cache, the prompt as leading input embeddings. It also trims the logits of prepended
virtual tokens so that every caller sees one logit row per real input token.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import NotMergeable, base_model_of
from tunesmith.methods.peft_method import PeftMethod


class VirtualTokenModel(nn.Module):
    """A peft prompt-learning model whose ``forward`` and ``generate`` line up with the real tokens.

    Attributes:
        peft_model: The ``PeftModelForCausalLM`` doing the work (saved as an ordinary peft folder).
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    @property
    def peft_config(self):
        return self.peft_model.active_peft_config

    @property
    def uses_prefix_cache(self) -> bool:
        """Prefix tuning puts its tokens in the key/value cache; prompt methods prepend embeddings."""
        return self.peft_config.peft_type.value == "PREFIX_TUNING"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        output = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        output.logits = output.logits[:, -input_ids.shape[1] :]  # (batch, seq, vocab): real tokens only
        return output

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Like ``model.generate``: the prompt ids followed by the new tokens."""
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        virtual = torch.ones(batch_size, self.peft_config.num_virtual_tokens, dtype=attention_mask.dtype,
                             device=attention_mask.device)
        attention_mask = torch.cat([virtual, attention_mask], dim=1)  # (batch, virtual + seq)
        base = base_model_of(self)
        if self.uses_prefix_cache:
            cache = {cache_argument(base): self.peft_model.get_prompt(batch_size=batch_size)}
            return base.generate(input_ids=input_ids, attention_mask=attention_mask, **cache, **kwargs)
        embeddings = self.peft_model.word_embeddings(input_ids)
        prompts = self.peft_model.get_prompt(batch_size=batch_size).to(embeddings.dtype)
        new_tokens = base.generate(inputs_embeds=torch.cat([prompts, embeddings], dim=1),
                                   attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new_tokens], dim=1)  # generate returns only new tokens for embeddings

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.peft_model, name)  # config, generation_config, save_pretrained, ...


class VirtualTokenMethod(PeftMethod):
    """A peft prompt-learning method; the model trains and generates through :class:`VirtualTokenModel`."""

    not_mergeable_because: str = ""
    supports_packing = False  # virtual tokens are prepended to every row
    frozen_base_in_autocast_dtype = False  # the float32 virtual tokens meet the base's embeddings: not measured yet

    def apply(self, model: nn.Module) -> nn.Module:
        check_fits(model, self.kind, self.config.virtual_tokens)
        return VirtualTokenModel(super().apply(model))

    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        if state_dict is not None:
            raise TunesmithError(f"{self.kind} cannot be trained with train.distributed: fsdp; use ddp")
        model.peft_model.save_pretrained(directory)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        return VirtualTokenModel(super().load(base_model, directory))

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeable(self.not_mergeable_because)


def check_fits(model: nn.Module, kind: str, virtual_tokens: int) -> None:
    """The virtual tokens must leave room in the context, and the model must be a decoder we can feed.

    Raises:
        TunesmithError: If the model's context is too short or it takes neither embeddings nor a cache.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and virtual_tokens >= context // 2:
        raise TunesmithError(
            f"method.virtual_tokens={virtual_tokens} takes half or more of {type(model).__name__}'s context of "
            f"{context} tokens; use fewer virtual tokens"
        )
    parameters = inspect.signature(model.forward).parameters
    needed = cache_argument(model) if kind == "prefix" else "inputs_embeds"
    if needed not in parameters:
        raise TunesmithError(
            f"method '{kind}' needs a model whose forward takes {needed}, and {type(model).__name__} does not"
        )


def cache_argument(model: nn.Module) -> str:
    """The name of the key/value cache argument: ``cache`` since transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
