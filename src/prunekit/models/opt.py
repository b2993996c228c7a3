"""OPT: LayerNorm with bias, learned positions, plain ReLU MLP (fc1, fc2), no GQA."""

from prunekit.models.base import Attention, Mlp, ModelAdapter, register


@register
class OptAdapter(ModelAdapter):
    model_types = ("opt",)
    family = "OPT"
    mlp_width_key = "ffn_dim"
    blocks_path = "model.decoder.layers"
    final_norm_path = "model.decoder.final_layer_norm"
    embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")

    def rotation_problem(self):
        if not getattr(self.config, "do_layer_norm_before", True):
            return "its blocks normalise after the residual add (do_layer_norm_before=False, as OPT-350m)"
        if self.model.get_submodule("model.decoder").project_in is not None:
            return "its embeddings are projected into the stream (word_embed_proj_dim != hidden_size, as OPT-350m)"
        return None  # pre-norm LayerNorm blocks: centred and converted to RMSNorm first

    def attention(self, block):
        attn = block.self_attn
        heads, kv, head_dim = self._heads()
        return Attention(
            q=attn.q_proj,
            k=attn.k_proj,
            v=attn.v_proj,
            o=attn.out_proj,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
        )

    def mlp(self, block):
        return Mlp(up=block.fc1, down=block.fc2)

    def norms(self, block):
        return {"input": block.self_attn_layer_norm, "post_attention": block.final_layer_norm}

    def logits(self, hidden):
        decoder = self.model.get_submodule("model.decoder")
        hidden = decoder.final_layer_norm(hidden) if decoder.final_layer_norm is not None else hidden
        hidden = decoder.project_out(hidden) if decoder.project_out is not None else hidden
        return self.lm_head()(hidden)
