"""LoRA through peft: trainable low-rank updates beside frozen linear layers."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunesmith.methods.base import METHODS, Method


@METHODS.register("lora")
class LoRA(Method):
    """LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685); the result is a peft adapter folder."""

    kind = "lora"
    artifact = "adapter"

    def peft_config(self):
        from peft import LoraConfig

        targets = self.config.targets if self.config.targets == "all-linear" else list(self.config.targets)
        return LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
