"""Phi-3: fused qkv_proj ([q; k; v] rows) and fused gate_up_proj ([gate; up] rows)."""

from prunekit.models.base import Attention, Mlp, ModelAdapter, register


@register
class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    family = "Phi-3"
    blocks_path = "model.layers"
    final_norm_path = "model.norm"
    embedding_paths = ("model.embed_tokens",)

    def rotation_problem(self):
        return None  # pre-norm RMSNorm blocks; the fused qkv and gate_up read the stream like any linear

    def attention(self, block):
        heads, kv, head_dim = self._heads()
        attn = block.self_attn
        return Attention(qkv=attn.qkv_proj, o=attn.o_proj, num_heads=heads, num_kv_heads=kv, head_dim=head_dim)

    def mlp(self, block):
        return Mlp(gate_up=block.mlp.gate_up_proj, down=block.mlp.down_proj)

    def norms(self, block):
        return {"input": block.input_layernorm, "post_attention": block.post_attention_layernorm}
