"""Gemma 3 (text): the Llama layout plus pre/post feed-forward norms, q/k norms, sliding-window layer
types (the engine records each block's own mask) and optional final-logit soft-capping."""

import torch

from prunekit.models.base import register
from prunekit.models.llama import LlamaAdapter


@register
class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)
    family = "Gemma 3"
    mlp_norm = "pre_feedforward"  # post_attention normalises the attention's output before the residual add
    norm_gain_offset = 1.0  # Gemma3RMSNorm scales by (1 + weight)

    def embedding_scale(self, hidden_size):
        return hidden_size**0.5  # Gemma3TextScaledWordEmbedding, built with sqrt(config.hidden_size)

    def rebuild_embedding_scale(self):
        embedding = self.embeddings()[0]
        scale = self.embedding_scale(self.config.hidden_size)
        embedding.scalar_embed_scale = scale  # what its init re-fills the buffer with
        embedding.embed_scale.fill_(scale)

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
