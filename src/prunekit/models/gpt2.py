"""GPT-2: Conv1D linears (weights stored [in, out]), fused c_attn ([q; k; v]), learned positions."""

from prunekit.models.base import Attention, Mlp, ModelAdapter, register


@register
class Gpt2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    family = "GPT-2"
    mlp_width_key = "n_inner"  # None in the config means 4 * n_embd; a pruned model writes the number
    blocks_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    embedding_paths = ("transformer.wte", "transformer.wpe")

    def rotation_problem(self):
        return None  # pre-norm LayerNorm blocks: centred and converted to RMSNorm first

    def attention(self, block):
        heads, kv, head_dim = self._heads()
        return Attention(
            qkv=block.attn.c_attn, o=block.attn.c_proj, num_heads=heads, num_kv_heads=kv, head_dim=head_dim
        )

    def mlp(self, block):
        return Mlp(up=block.mlp.c_fc, down=block.mlp.c_proj)

    def norms(self, block):
        return {"input": block.ln_1, "post_attention": block.ln_2}
