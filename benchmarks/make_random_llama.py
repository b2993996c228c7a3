"""Write a Llama-2-7B-shaped model with random bf16 weights to disk, one shard per block, without
ever holding the whole model in memory; plus a word-level tokenizer (32,000 ids) trained on the C4
sample (or Python's docs when the sample is absent), so the CLI can run on it end to end.

    python benchmarks/make_random_llama.py /tmp/llama7b-random [--layers 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from prunekit.data import load_text


def shard_tensors(config: LlamaConfig, index: int | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    if index is None:
        return {
            "model.embed_tokens.weight": rand(v, h),
            "lm_head.weight": rand(v, h),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    p = f"model.layers.{index}."
    return {
        p + "self_attn.q_proj.weight": rand(h, h),
        p + "self_attn.k_proj.weight": rand(h, h),
        p + "self_attn.v_proj.weight": rand(h, h),
        p + "self_attn.o_proj.weight": rand(h, h),
        p + "mlp.gate_proj.weight": rand(i, h),
        p + "mlp.up_proj.weight": rand(i, h),
        p + "mlp.down_proj.weight": rand(h, i),
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
    }


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    try:
        text = load_text("c4").text
    except Exception:
        text = load_text("pydoc").text
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        text.split("\n"), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards = [None, *range(args.layers)]
    weight_map = {}
    for n, index in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = shard_tensors(config, index, generator)
        save_file(tensors, str(args.out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        print(f"wrote {name}", flush=True)
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(args.out)
    write_tokenizer(args.out, config.vocab_size)


if __name__ == "__main__":
    main()
