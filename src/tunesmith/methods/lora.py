"""LoRA and its variants through peft: DoRA, rsLoRA, and LoRA+ (its own learning rate for B).

Mixture-of-experts models (Qwen3-MoE, and every transformers 5 MoE) hold their experts as 3-D
parameters (``experts.gate_up_proj``: (experts, 2 x intermediate, hidden)), not as linear layers, so
a list of linear-layer names cannot reach them. peft's ``all-linear`` does: it adds the experts
(``gate_up_proj`` at twice the rank, ``down_proj``: one low-rank update per expert) and the router
(``gate.weight``) as ``target_parameters``. peft wraps those in its ``ParamWrapper``, which refuses
dropout (the cause of "method 'lora' does not fit Qwen3MoeForCausalLM" at the default
``method.dropout``): there the dropout applies to the linear layers only (see :meth:`LoRA.apply`).
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from tunesmith.methods.base import METHODS, check_module_names, decay_groups
from tunesmith.methods.loftq import loftq_initialise
from tunesmith.methods.lora_addmm import fuse_lora_updates
from tunesmith.methods.peft_method import PeftMethod, peft_task_type

logger = logging.getLogger(__name__)


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
        mixture = model is not None and bool(expert_parameters(model))
        if mixture and targets == "all-linear":
            logger.info("LoRA on a mixture of experts: every linear layer, the router and the expert weights %s "
                        "(peft's all-linear)", ", ".join(expert_parameters(model)))
        return LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=0.0 if mixture else self.config.dropout,  # apply() puts it back on the linear layers
            target_modules=targets,
            use_dora=self.config.dora,
            use_rslora=self.config.rslora,
            task_type=peft_task_type(model),
        )

    def apply(self, model: nn.Module) -> nn.Module:
        """peft's LoRA; on a mixture of experts, ``method.dropout`` goes on the linear layers' updates only.

        With ``method.init: loftq`` the update over each nf4 layer starts as LoftQ sets it (:mod:`methods.loftq`).

        peft refuses dropout on the router and experts it wraps as parameters (``ParamWrapper``): the
        adapter is built without dropout, then each ordinary LoRA layer gets peft's own dropout module.
        """
        adapted = super().apply(model)
        if self.config.init == "loftq":

            layers, left = loftq_initialise(adapted, model.name_or_path)
            self.loftq_note = (f"LoftQ start: the updates of {layers} nf4 layers correct their rounding; "
                               f"{left:.0%} of the rounding error is left at rank {self.config.r}")
        if self.config.dropout > 0 and expert_parameters(model):
            from peft.tuners.lora.layer import LoraLayer, ParamWrapper

            for module in adapted.modules():
                if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                    for adapter in module.lora_dropout:
                        module.lora_dropout[adapter] = nn.Dropout(p=self.config.dropout).train(module.training)
        return adapted

    def fuse_for_training(self, model: nn.Module) -> tuple[int, Callable[[], None]]:
        """The update of each layer with one plain adapter added by one ``addmm`` (:mod:`methods.lora_addmm`)."""
        return fuse_lora_updates(model)

    def summary(self) -> str:
        """With ``method.init: loftq``: how much of the base's rounding error the start corrects."""
        return getattr(self, "loftq_note", "")

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


def expert_parameters(model: nn.Module) -> list[str]:
    """The experts' stacked weights, as peft's ``target_parameters`` names them (``experts.gate_up_proj``).

    A mixture-of-experts block keeps each expert's matrices as one 3-D parameter (experts, out, in);
    nothing else in a causal LM is 3-D, so the shape finds them in every family without a name list.
    """
    found = set()
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() == 3 and parameter.is_floating_point():
                found.add(f"{module_name.rsplit('.', 1)[-1]}.{parameter_name}")
    return sorted(found)
