"""Per-layer check: GPTQ against round-to-nearest (4-bit, group 64) on SmolLM2-135M layers 0, 5 and 15: squared
output error on 16 C4 calibration windows (the ones the Hessian is built from) and on 8 held-out ones.

    python benchmarks/gptq_layers.py   (the run quoted in benchmarks/results/gptq.md: gptq-layers.txt)
"""

import torch

from prunekit import load
from prunekit.data import calibration
from prunekit.methods.gptq import gptq_quantize
from prunekit.methods.quant import QuantGrid, rtn
from prunekit.methods.stats import Hessian, on_inputs
from prunekit.models import get_adapter, linear_weight


def error(x, w, approx) -> float:
    return ((x @ (w - approx).t()) ** 2).sum().item()


def main():
    torch.set_num_threads(2)
    model, tokenizer = load("smollm2-135m")
    ids = calibration(tokenizer, "c4", n_samples=64, seqlen=512, seed=0).tokens
    adapter = get_adapter(model)
    linears = {f"{i}.{n}": lin for i in (0, 5, 15) for n, lin in adapter.block(i).linears().items()}
    inputs: dict[str, list] = {}

    def keep(name, linear, x):  # returns nothing: a pre-hook's return value would replace the input
        inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float().clone())

    with on_inputs(linears, keep), torch.no_grad():
        for batch in ids[:24].split(8):
            model(input_ids=batch)
    grid = QuantGrid(4, 64, True)
    for name, linear in linears.items():
        x = torch.cat(inputs[name])
        train, held_out = x[: 16 * 512], x[16 * 512 :]
        hessian = Hessian(x.shape[1], "cpu")
        hessian.update(train)
        w = linear_weight(linear).detach()
        q = gptq_quantize(w, hessian.matrix, grid)[0]
        r = rtn(w, grid)[0]
        diag = torch.diag(hessian.matrix)
        ratios = [error(d, w, q) / error(d, w, r) for d in (train, held_out)]
        print(f"{name:22s} {ratios[0]:.3f} {ratios[1]:.3f} {(diag.max() / diag.mean()).item():.0f}")


if __name__ == "__main__":
    main()
