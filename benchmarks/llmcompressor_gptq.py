# ruff: noqa: E402, SIM115  (a throwaway script for a separate venv, kept as it ran)
"""llm-compressor's GPTQ on SmolLM2-135M with prunekit's calibration tokens, in a throwaway venv (see gptq.md).

/tmp/llmc-venv/bin/python benchmarks/llmcompressor_gptq.py MODEL_DIR OUT_DIR none 1 64
"""

import json
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out, actorder = sys.argv[1], sys.argv[2], (None if sys.argv[3] == "none" else sys.argv[3])
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
tokens = torch.load("/tmp/calib_c4_64x512.pt", weights_only=True)  # a tensor: no pickled code runs
ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src)
group = int(sys.argv[5]) if len(sys.argv) > 5 else 128
weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
recipe = GPTQModifier(
    config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
    ignore=["lm_head"],
    dampening_frac=0.01,
    block_size=128,
    actorder=actorder,
    bypass_divisibility_checks=True,
)
reference = {k: v.clone() for k, v in model.state_dict().items()}
start = time.perf_counter()
oneshot(
    model=model,
    dataset=ds,
    recipe=recipe,
    max_seq_length=512,
    num_calibration_samples=64,
    shuffle_calibration_samples=False,
)
seconds = time.perf_counter() - start
# 576-wide layers are 4.5 groups of 128: compressed-tensors cannot pack them, so keep the fake-quantized floats
import os

from safetensors.torch import save_file

os.makedirs(out, exist_ok=True)
state = {
    k: v.detach().clone().contiguous()
    for k, v in model.state_dict().items()
    if k in reference and k != "lm_head.weight"
}  # tied head: saved once
w = state["model.layers.0.self_attn.q_proj.weight"]
distinct = [len(torch.unique(w[r, :128])) for r in range(4)]
save_file(state, out + "/weights.safetensors")
json.dump(
    {
        "seconds": seconds,
        "actorder": actorder,
        "distinct_values_first_group": distinct,
        "threads": torch.get_num_threads(),
        "group_size": group,
    },
    open(out + "/llmc_run.json", "w"),
)
print("done", seconds)
