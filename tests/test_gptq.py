"""GPTQ: hand-computed grids, better than round-to-nearest, joint with SparseGPT, compressed-tensors, resume."""

from dataclasses import replace

import pytest
import torch

from prunekit import load, save_pruned
from prunekit.data import Calibration
from prunekit.errors import PrunekitError
from prunekit.methods import METHODS, GPTQConfig, SparseGPTConfig, WandaConfig, prune
from prunekit.methods.gptq import gptq_quantize
from prunekit.methods.masks import parse_nm
from prunekit.methods.quant import QuantGrid, dequantize, grid_of, quant_codes, quant_grid, quantize_dequantize, rtn
from prunekit.methods.sparsegpt import sparsegpt_prune
from prunekit.methods.stats import Hessian, on_inputs
from prunekit.models import get_adapter, linear_weight
from prunekit.sequential import EngineConfig
from tiny_models import tiny_model, tiny_tokenizer, tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only contend (with each other and with whatever else the machine runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calib(n=8, seqlen=16, seed=0):
    return Calibration(tokens(n=n, seqlen=seqlen, seed=seed), "random", "-", seed)


def quiet():
    return EngineConfig(progress=False)


def on_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size=None) -> bool:
    W, s, z = weight.float(), scale.float(), zero.float()
    return torch.equal(dequantize(quant_codes(W, s, z, bits, group_size), s, z, group_size), W)


# --- the grid, by hand --------------------------------------------------------------------------------


def test_symmetric_4bit_grid_by_hand():
    # max |w| = 7.5 -> scale 2 * 7.5 / 15 = 1; codes round half to even (-1.5 -> -2) and clamp at 7 (7.5 -> 8 -> 7)
    w = torch.tensor([[-1.5, 0.5, 3.75, 7.5]])
    scale, zero = quant_grid(w, bits=4, group_size=-1, sym=True)
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[0.0]]
    assert quant_codes(w, scale, zero, 4).tolist() == [[-2.0, 0.0, 4.0, 7.0]]
    assert quantize_dequantize(w, scale, zero, 4).tolist() == [[-2.0, 0.0, 4.0, 7.0]]


def test_asymmetric_2bit_grid_round_trips_a_matrix_on_it():
    # [0, 3] over the four 2-bit codes -2..1: scale 1, zero point -2, codes w - 2; the values come back exactly
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, 0.0]])
    scale, zero = quant_grid(w, bits=2, group_size=-1, sym=False)
    assert scale.tolist() == [[1.0], [1.0]] and zero.tolist() == [[-2.0], [1.0]]
    assert quant_codes(w, scale, zero, 2).tolist() == [[-2.0, -1.0, 0.0, 1.0], [-2.0, -1.0, 0.0, 1.0]]
    assert torch.equal(quantize_dequantize(w, scale, zero, 2), w)


def test_groups_have_their_own_scales():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25], [4.0, 4.0, -8.0, 1.0]])
    scale, zero = quant_grid(w, bits=4, group_size=2, sym=True)  # scale = 2 * max|w| / 15 per row and pair
    assert torch.allclose(scale, torch.tensor([[4.0, 1.0], [8.0, 16.0]]) / 15)
    assert torch.equal(zero, torch.zeros(2, 2))
    codes = torch.tensor([[3.0, -8.0, 7.0, -1.0], [0.0, 5.0, -6.0, 2.0]])
    on = dequantize(codes, scale, zero)  # a matrix on that grid comes back bit for bit
    assert torch.equal(quant_codes(on, scale, zero, 4), codes)
    assert torch.equal(quantize_dequantize(on, scale, zero, 4), on)


def test_zero_is_on_every_grid_and_an_all_zero_group_stays_finite():
    w = torch.tensor([[0.0, 0.0, 0.3, -0.7], [0.0, 0.0, 0.0, 0.0]])
    for sym in (True, False):
        scale, zero = quant_grid(w, bits=3, group_size=2, sym=sym)
        assert torch.isfinite(scale).all()
        assert (quantize_dequantize(w, scale, zero, 3)[w == 0] == 0).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GPTQConfig(bits=5), "--bits must be one of 2, 3, 4, 8, got 5"),
        (lambda: GPTQConfig(bits=16), "--bits"),
        (lambda: GPTQConfig(group_size=0), "--group-size"),
        (lambda: GPTQConfig(group_size=-2), "--group-size"),
        (lambda: GPTQConfig(percdamp=0), "--percdamp"),
        (lambda: GPTQConfig(order="random"), "--order"),
        (lambda: SparseGPTConfig(bits=1), "--bits"),
    ],
)
def test_bad_settings_are_one_line_errors(make, match):
    with pytest.raises(PrunekitError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_a_short_last_group_gets_its_own_scale():
    # 6 columns in groups of 4: columns 4-5 form a group of two (GPTQ's reference grouping, column // 4)
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.75, -0.3]])
    scale, zero = quant_grid(w, bits=4, group_size=4, sym=True)
    assert torch.allclose(scale, torch.tensor([[6.0, 1.5]]) / 15)
    on = dequantize(torch.tensor([[3.0, -8.0, 7.0, -1.0, 5.0, -6.0]]), scale, zero, group_size=4)
    assert torch.equal(quantize_dequantize(on, scale, zero, 4, group_size=4), on)


def test_compressed_tensors_refuses_a_group_size_that_does_not_divide_a_layer(tmp_path):
    pytest.importorskip("compressed_tensors")
    from prunekit.export.compressed import save_compressed

    model = tiny_model("llama")  # widths 64 and 128
    config = GPTQConfig(group_size=48)
    prune(model, config, calib(), quiet())  # GPTQ itself takes a short last group
    with pytest.raises(PrunekitError, match="--group-size to divide every layer's width") as info:
        save_compressed(model, None, tmp_path / "q", config.grid)
    assert "\n" not in str(info.value) and "--group-size 64" in str(info.value)


# --- GPTQ against round-to-nearest ---------------------------------------------------------------------


def _correlated_inputs(tokens=256, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 8, generator=g) @ torch.randn(8, features, generator=g) + 0.1 * torch.randn(
        tokens, features, generator=g
    )


@pytest.mark.parametrize(
    "grid, act_order",
    [(QuantGrid(4, 16, True), False), (QuantGrid(3, -1, False), True), (QuantGrid(4, 24, True), False)],
)
def test_gptq_reconstructs_a_layer_better_than_rounding(grid, act_order):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = Hessian(64, "cpu")
    h.update(x)
    q, scale, zero = gptq_quantize(w, h.matrix, grid, blocksize=16, act_order=act_order)
    assert on_grid(q, scale, zero, grid.bits, grid.group_size)
    rounded = rtn(w, grid)[0]
    gptq_err, rtn_err = (x @ (w - q).t()).norm(), (x @ (w - rounded).t()).norm()
    assert gptq_err < 0.7 * rtn_err


def dense_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every decoder linear's inputs on ``ids`` in the unquantized model: the layer-wise calibration loss."""
    adapter = get_adapter(model)
    linears = {f"{i}.{n}": lin for i in range(adapter.num_blocks()) for n, lin in adapter.block(i).linears().items()}
    seen = {}

    def keep(name, linear, x):  # a pre-hook's return value would replace the input: return nothing
        seen[name] = x.reshape(-1, x.shape[-1]).clone()

    with on_inputs(linears, keep), torch.no_grad():
        model(input_ids=ids)
    return seen


def layer_errors(model, reference, inputs) -> dict[str, float]:
    ours, theirs = get_adapter(model), get_adapter(reference)
    errors = {}
    for i in range(ours.num_blocks()):
        for name, lin in ours.block(i).linears().items():
            x = inputs[f"{i}.{name}"]
            delta = linear_weight(lin) - linear_weight(theirs.block(i).linears()[name])
            errors[f"{i}.{name}"] = (x @ delta.t()).norm().item() ** 2
    return errors


def test_gptq_beats_rounding_on_a_tiny_model_on_its_own_calibration_loss():
    data = calib(n=16, seqlen=32)
    dense = tiny_model("llama")
    inputs = dense_inputs(dense, data.tokens)
    grid = QuantGrid(3, 16, True)
    gptq = tiny_model("llama")  # block order with dense propagation: each layer's Hessian is of exactly these inputs
    prune(gptq, GPTQConfig(bits=3, group_size=16, order="block"), data, EngineConfig(propagate="dense", progress=False))
    rounded = tiny_model("llama")
    from prunekit.methods.quant import rtn_model

    rtn_model(rounded, grid)
    g, r = layer_errors(gptq, dense, inputs), layer_errors(rounded, dense, inputs)
    assert sum(g.values()) < 0.8 * sum(r.values())
    assert all(g[k] < r[k] for k in g), {k: (g[k], r[k]) for k in g}


# --- joint with pruning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_with_bits_keeps_its_zeros_and_puts_the_rest_on_the_grid(nm):
    x = _correlated_inputs()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    h = Hessian(64, "cpu")
    h.update(x)
    grid = QuantGrid(4, 16, True)
    q, scale, zero = sparsegpt_prune(w, h.matrix, 0.5, nm, blocksize=32, grid=grid)
    pruned = sparsegpt_prune(w, h.matrix, 0.5, nm, blocksize=32)  # the mask alone, at full precision
    assert on_grid(q, scale, zero, 4)
    if nm is None:
        assert (q == 0).sum() >= w.numel() // 2
    else:
        assert ((q == 0).reshape(16, -1, 4).sum(-1) >= 2).all()
    assert (q == 0).sum() >= (pruned == 0).sum()


def test_joint_sparsegpt_and_gptq_on_a_pruned_model_keep_exact_zeros():
    model = tiny_model("llama")
    prune(model, SparseGPTConfig(nm="2:4", bits=4, group_size=16), calib(), quiet())
    n, m = parse_nm("2:4")
    for i in range(2):
        for name, lin in get_adapter(model).block(i).linears().items():
            w = linear_weight(lin)
            assert ((w == 0).reshape(w.shape[0], -1, m).sum(-1) >= n).all(), (i, name)
            assert on_grid(w, *grid_of(lin), 4), (i, name)

    wanda = tiny_model("llama")
    prune(wanda, WandaConfig(0.5), calib(), quiet())
    zeros = {k: v == 0 for k, v in wanda.state_dict().items() if "layers" in k and v.dim() == 2}
    prune(wanda, GPTQConfig(bits=4, group_size=16), calib(), quiet())  # zeros kept by default
    for k, mask in zeros.items():
        assert (wanda.state_dict()[k][mask] == 0).all(), k


def test_gptq_runs_on_a_model_with_blocks_of_different_widths(tmp_path):
    from test_shapes import non_uniform

    save_pruned(non_uniform("llama"), tiny_tokenizer(), tmp_path / "pruned", {"method": "test"})
    model, _ = load(tmp_path / "pruned")
    prune(model, GPTQConfig(bits=4, group_size=16), calib(), quiet())
    widths = {linear_weight(lin).shape for i in range(2) for lin in get_adapter(model).block(i).linears().values()}
    assert len(widths) > 3
    for i in range(2):
        for lin in get_adapter(model).block(i).linears().values():
            assert on_grid(linear_weight(lin), *grid_of(lin), 4)


# --- compressed-tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [QuantGrid(4, 16, True), QuantGrid(8, -1, False), QuantGrid(3, 32, True)])
def test_compressed_tensors_round_trip_is_exact(grid, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from prunekit.export.compressed import folder_bytes, save_compressed

    model = tiny_model("llama")
    prune(model, GPTQConfig(bits=grid.bits, group_size=grid.group_size, sym=grid.sym), calib(), quiet())
    save_compressed(model, tiny_tokenizer(), tmp_path / "q", grid)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = tokens(n=2, seqlen=16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    if grid.bits == 4:  # the packed folder is smaller than the float32 one
        save_pruned(model, None, tmp_path / "dense", {})
        assert folder_bytes(tmp_path / "q") < folder_bytes(tmp_path / "dense")


def test_compressed_save_refuses_weights_moved_off_their_grid(tmp_path):
    pytest.importorskip("compressed_tensors")
    from prunekit.export.compressed import save_compressed

    model = tiny_model("llama")
    config = GPTQConfig(bits=4, group_size=16)
    prune(model, config, calib(), quiet())
    with torch.no_grad():
        linear_weight(get_adapter(model).block(1).mlp.down).add_(1e-3)  # e.g. fine-tuned after quantizing
    with pytest.raises(PrunekitError, match="off the grid"):
        save_compressed(model, None, tmp_path / "q", config.grid)
    assert not (tmp_path / "q").exists()


# --- resume ---------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=16), SparseGPTConfig(0.5, bits=3, group_size=32)])
def test_resume_after_interruption_matches_uninterrupted_run(config, tmp_path, monkeypatch):
    reference = tiny_model("llama")
    prune(reference, config, calib(), quiet())

    method = METHODS[type(config)]

    def crash_at_second_block(prepared, step):
        if step.index == 1:
            raise Interrupt
        return method.block(prepared, step)

    engine = EngineConfig(progress=False, checkpoint_dir=tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        patch.setitem(METHODS, type(config), replace(method, block=crash_at_second_block))
        with pytest.raises(Interrupt):
            prune(tiny_model("llama"), config, calib(), engine)

    fresh = tiny_model("llama")  # a new process: the weights in memory are the original ones
    result = prune(fresh, config, calib(), engine)
    assert result.engine.resumed_from == 1
    for (name, a), b in zip(reference.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for i in range(2):
        ours, theirs = get_adapter(fresh).block(i).linears(), get_adapter(reference).block(i).linears()
        for name in ours:
            assert all(torch.equal(a, b) for a, b in zip(grid_of(ours[name]), grid_of(theirs[name]), strict=True))
