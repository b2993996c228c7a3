"""Gemma 3 (text): the Llama layout plus pre/post feed-forward norms, q/k norms, sliding-window layer
types (the engine records each block's own mask) and optional final-logit soft-capping."""

import torch

from prunekit.models.base import register
from prunekit.models.llama import LlamaAdapter


@register
class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)
    family = "Gemma 3"

    def norms(self, block):
        names = (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
        return {name.removesuffix("_layernorm"): getattr(block, name) for name in names}

    def rotation_problem(self):
        return (
            "Gemma 3 normalises each sub-layer's output before the residual add (post_attention_layernorm, "
            "post_feedforward_layernorm), so no linear sits between that norm and the stream to absorb a rotation"
        )

    def logits(self, hidden):
        logits = super().logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
