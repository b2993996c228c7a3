"""Llama family: Llama 2/3, Mistral, Qwen2, Qwen3 (q/k norms), SmolLM2; GQA, SwiGLU MLP."""

from prunekit.models.base import Attention, Mlp, ModelAdapter, register


@register
class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    family = "Llama"
    blocks_path = "model.layers"
    final_norm_path = "model.norm"
    embedding_paths = ("model.embed_tokens",)

    def rotation_problem(self):
        return None  # pre-norm RMSNorm blocks; Qwen3's q/k norms act inside a head, away from the stream

    def attention(self, block):
        attn = block.self_attn
        heads, kv, head_dim = self._heads()
        extra = {name: getattr(attn, name) for name in ("q_norm", "k_norm") if hasattr(attn, name)}
        return Attention(
            q=attn.q_proj,
            k=attn.k_proj,
            v=attn.v_proj,
            o=attn.o_proj,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            extra_norms=extra,
        )

    def mlp(self, block):
        return Mlp(gate=block.mlp.gate_proj, up=block.mlp.up_proj, down=block.mlp.down_proj)

    def norms(self, block):
        return {"input": block.input_layernorm, "post_attention": block.post_attention_layernorm}
