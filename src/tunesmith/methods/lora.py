"""LoRA and its variants through peft: DoRA, rsLoRA, and LoRA+ (its own learning rate for B)."""

from __future__ import annotations

from torch import nn

from tunesmith.methods.base import METHODS, check_module_names, decay_groups
from tunesmith.methods.peft_method import PeftMethod, peft_task_type


@METHODS.register_kind
class LoRA(PeftMethod):
    """LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685); the result is a peft adapter folder."""

    kind = "lora"
    description = "Low-rank update B·A beside frozen linear layers (variants: dora, rslora, LoRA+ learning rate)."

    def peft_config(self, model: nn.Module | None = None):
        from peft import LoraConfig

        targets = self.config.targets
        if targets != "all-linear":
            targets = list(targets)
            if model is not None:
                check_module_names(model, targets, "method.targets")
        return LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=targets,
            use_dora=self.config.dora,
            use_rslora=self.config.rslora,
            task_type=peft_task_type(model),
        )

    def param_groups(self, model: nn.Module, train_config) -> list[dict]:
        """With LoRA+, the B matrices learn ``loraplus_lr_ratio`` times faster than the rest.

        peft's ``create_loraplus_optimizer`` builds a whole optimizer; we need groups so that the
        one AdamW and the one schedule of the loop stay in charge, hence these few lines.
        """
        ratio = self.config.loraplus_lr_ratio
        if ratio is None:
            return super().param_groups(model, train_config)
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        b_matrices = [p for name, p in trainable if "lora_B" in name or "lora_embedding_B" in name]
        others = [p for name, p in trainable if not ("lora_B" in name or "lora_embedding_B" in name)]
        return (decay_groups(others, train_config.weight_decay)
                + decay_groups(b_matrices, train_config.weight_decay, lr=train_config.lr * ratio))
