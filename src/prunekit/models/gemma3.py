"""Gemma 3 (text): extra pre/post feed-forward norms, q/k norms, sliding-window layer types."""

import torch

from prunekit.models.base import Attention, Mlp, ModelAdapter, register


@register
class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3_text",)
    family = "Gemma 3"
    blocks_path = "model.layers"
    final_norm_path = "model.norm"
    embedding_paths = ("model.embed_tokens",)

    def attention(self, block):
        attn = block.self_attn
        heads, kv, head_dim = self._heads()
        return Attention(
            q=attn.q_proj,
            k=attn.k_proj,
            v=attn.v_proj,
            o=attn.o_proj,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            extra_norms={"q_norm": attn.q_norm, "k_norm": attn.k_norm},
        )

    def mlp(self, block):
        return Mlp(gate=block.mlp.gate_proj, up=block.mlp.up_proj, down=block.mlp.down_proj)

    def norms(self, block):
        names = (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
        return {name.removesuffix("_layernorm"): getattr(block, name) for name in names}

    def logits(self, hidden):
        logits = super().logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
