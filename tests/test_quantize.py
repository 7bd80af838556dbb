"""Quantizer math against vectors computed by hand (expected numbers written literally)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.layers import QTensor, WeightFormat
from tritpress.compressor.quantize import (dequantize, quantize_activations_int8, quantize_int2_rows, quantize_rows,
                                          quantize_ternary, ste, ternary_absmean, ternary_twn)

# Shared 2x3 weight:
#   row 0: [ 0.8, -0.4, 0.1]   |.| sum 1.3, mean 0.433333
#   row 1: [-2.0,  0.2, 0.4]   |.| sum 2.6, mean 0.866667
#   whole tensor: mean|W| = 3.9 / 6 = 0.65
W = torch.tensor([[0.8, -0.4, 0.1], [-2.0, 0.2, 0.4]])


def close(a, b, tol=1e-6):
    return torch.allclose(a.float(), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ------------------------------------------------------------------ absmean (BitNet b1.58)

def test_absmean_per_tensor_hand_computed():
    # alpha = 0.65; W / alpha:
    #   row 0:  1.2308 -> 1, -0.6154 -> -1, 0.1538 -> 0
    #   row 1: -3.0769 -> clamp -1, 0.3077 -> 0, 0.6154 -> 1
    codes, alpha = ternary_absmean(W)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -1, 0], [-1, 0, 1]]
    assert alpha.shape == (1,)
    assert close(alpha, [0.65])


def test_absmean_per_channel_hand_computed():
    # row 0: alpha 0.433333 -> 0.8/a = 1.846 -> 1, -0.4/a = -0.923 -> -1, 0.1/a = 0.231 -> 0
    # row 1: alpha 0.866667 -> -2/a = -2.31 -> -1, 0.2/a = 0.231 -> 0, 0.4/a = 0.4615 -> 0
    codes, alpha = ternary_absmean(W, per_channel=True)
    assert codes.tolist() == [[1, -1, 0], [-1, 0, 0]]
    assert close(alpha, [1.3 / 3, 2.6 / 3])
    assert close(alpha, [0.4333333, 0.8666667], tol=1e-6)


def test_absmean_all_zero_tensor_gives_zero_codes_not_nan():
    # alpha = 0 -> W / (0 + 1e-5) = 0 -> codes 0; no division by zero
    codes, alpha = ternary_absmean(torch.zeros(3, 4))
    assert codes.abs().sum() == 0 and alpha.tolist() == [0.0]


def test_absmean_eps_in_denominator():
    # w = [0.500002, 1.499998, 1.0, -1.0]: mean|w| = 4.0 / 4 = 1.0
    # with eps: 0.500002 / 1.00001 = 0.499997 -> 0   (without eps it would round to 1)
    #           1.499998 / 1.00001 = 1.499983 -> 1, 1.0 / 1.00001 = 0.99999 -> 1, -> -1
    w = torch.tensor([0.500002, 1.499998, 1.0, -1.0])
    codes, alpha = ternary_absmean(w)
    assert codes.tolist() == [0, 1, 1, -1]
    assert close(alpha, [1.0])


def test_absmean_per_channel_on_3d_weight_uses_first_dim_as_rows():
    # [2, 2, 2]: row 0 = [[1, -1], [0.1, 3]] mean|.| = 5.1/4 = 1.275 -> codes [[1,-1],[0,1]]
    #            row 1 = [[0, 0], [0.2, -0.2]] mean = 0.1 -> codes [[0,0],[1,-1]]
    w = torch.tensor([[[1.0, -1.0], [0.1, 3.0]], [[0.0, 0.0], [0.2, -0.2]]])
    codes, alpha = ternary_absmean(w, per_channel=True)
    assert codes.tolist() == [[[1, -1], [0, 1]], [[0, 0], [1, -1]]]
    assert close(alpha, [1.275, 0.1])


# ------------------------------------------------------------------ TWN

def test_twn_per_tensor_hand_computed():
    # delta = 0.7 * 0.65 = 0.455; |w| > delta: 0.8 and 2.0 only (0.4 < 0.455)
    # alpha = (0.8 + 2.0) / 2 = 1.4; codes = sign(w) where kept
    codes, alpha = ternary_twn(W)
    assert codes.tolist() == [[1, 0, 0], [-1, 0, 0]]
    assert close(alpha, [1.4])


def test_twn_per_channel_hand_computed_with_zero_row():
    # row 0: delta = 0.7 * 0.433333 = 0.303333 -> keeps 0.8, -0.4 -> alpha 0.6, codes [1, -1, 0]
    # row 1: delta = 0.7 * 0.866667 = 0.606667 -> keeps -2.0     -> alpha 2.0, codes [-1, 0, 0]
    # row 2: all zero -> nothing kept -> alpha 0, codes 0 (no 0/0)
    w = torch.cat([W, torch.zeros(1, 3)])
    codes, alpha = ternary_twn(w, per_channel=True)
    assert codes.tolist() == [[1, -1, 0], [-1, 0, 0], [0, 0, 0]]
    assert close(alpha, [0.6, 2.0, 0.0])
    assert torch.isfinite(alpha).all()


def test_twn_threshold_is_0_7_of_mean_abs():
    # w = [1.0, -0.36, 0.5, 0.14]: mean|w| = 2.0 / 4 = 0.5 -> delta = 0.35
    # kept (|w| > 0.35): 1.0, -0.36, 0.5 -> alpha = 1.86 / 3 = 0.62; 0.14 -> 0
    # (a 0.75 factor, delta 0.375, would drop -0.36)
    codes, alpha = ternary_twn(torch.tensor([1.0, -0.36, 0.5, 0.14]))
    assert codes.tolist() == [1, -1, 1, 0]
    assert close(alpha, [0.62])


def test_quantize_ternary_dispatches_method_and_granularity():
    assert quantize_ternary(W, "absmean", "tensor")[0].tolist() == [[1, -1, 0], [-1, 0, 1]]
    assert quantize_ternary(W, "absmean", "channel")[0].tolist() == [[1, -1, 0], [-1, 0, 0]]
    assert quantize_ternary(W, "twn", "tensor")[0].tolist() == [[1, 0, 0], [-1, 0, 0]]
    assert quantize_ternary(W, "twn", "channel")[0].tolist() == [[1, -1, 0], [-1, 0, 0]]


@pytest.mark.parametrize("method,granularity", [("bitnet", "tensor"), ("", "tensor"), ("absmean", "row"),
                                                ("twn", "per_channel"), ("ABSMEAN", "tensor")])
def test_quantize_ternary_rejects_unknown_method_or_granularity(method, granularity):
    with pytest.raises(ValueError):
        quantize_ternary(W, method, granularity)


@pytest.mark.parametrize("field,value", [("method", "bitnet"), ("granularity", "row"), ("act_bits", 4),
                                         ("embedding", "int3"), ("head", "fp8"), ("float_dtype", "int8"),
                                         ("scale_dtype", "ternary")])
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError):
        TernaryConfig(**{field: value})


# ------------------------------------------------------------------ int8 / int4 rows

def test_quantize_rows_int8_hand_computed():
    # row 0: absmax 1.27 -> scale 0.01: 1.27 -> 127, -0.6 -> -60, 0.1 -> 10
    # row 1: all zero -> scale 0, codes 0
    # row 2: absmax 2.54 -> scale 0.02: -2.54 -> -127, 1.0 -> 50, 0.02 -> 1
    w = torch.tensor([[1.27, -0.6, 0.1], [0.0, 0.0, 0.0], [-2.54, 1.0, 0.02]])
    codes, scale = quantize_rows(w, 8)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[127, -60, 10], [0, 0, 0], [-127, 50, 1]]
    assert close(scale, [0.01, 0.0, 0.02])


def test_quantize_rows_int4_hand_computed():
    # row 0: absmax 0.7 -> scale 0.1:  0.7 -> 7, -0.33 -> -3.3 -> -3, 0.04 -> 0.4 -> 0, 0.26 -> 2.6 -> 3
    # row 1: absmax 1.4 -> scale 0.2: -1.4 -> -7, 0.86 -> 4.3 -> 4, 0.13 -> 0.65 -> 1, 0 -> 0
    w = torch.tensor([[0.7, -0.33, 0.04, 0.26], [-1.4, 0.86, 0.13, 0.0]])
    codes, scale = quantize_rows(w, 4)
    assert codes.tolist() == [[7, -3, 0, 3], [-7, 4, 1, 0]]
    assert close(scale, [0.1, 0.2])
    assert int(codes.abs().max()) <= 7


def test_quantize_int2_rows_hand_computed():
    # row 0: rms sqrt((1 + 0.25 + 0.01 + 4) / 4) = 1.1467; its largest magnitude is -2 (negative side):
    #   scale +1.1467: 1 -> 0.87 -> 1, -0.5 -> -0.44 -> 0, 0.1 -> 0, -2 -> -1.74 -> -2
    # row 1: rms sqrt((2.56 + 0.64 + 0.16 + 0.64) / 4) = 1, largest magnitude +1.6 (positive side):
    #   scale -1 so that code -2 is +2: 1.6 -> -1.6 -> -2, -0.8 -> 0.8 -> 1, 0.4 -> -0.4 -> 0, -0.8 -> 1
    # row 2: zeros -> scale 0, codes 0 (no nan)
    w = torch.tensor([[1.0, -0.5, 0.1, -2.0], [1.6, -0.8, 0.4, -0.8], [0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_int2_rows(w)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, 0, 0, -2], [-2, 1, 0, 1], [0, 0, 0, 0]]
    assert close(scale, [math.sqrt(5.26 / 4), -1.0, 0.0])
    assert set(codes.unique().tolist()) <= {-2, -1, 0, 1}


def test_int2_beats_ternary_and_absmax_on_gaussian_rows():
    """The grid and scale the docstring argues for: lower error than per-row ternary."""
    torch.manual_seed(0)
    w = torch.randn(256, 128)
    err = lambda fmt: (QTensor.from_float(w, fmt).dequantize() - w).pow(2).mean()  # noqa: E731
    int2 = err(WeightFormat("int2", scale_dtype="fp32"))
    assert int2 < 0.16
    assert int2 < 0.7 * err(WeightFormat("ternary", granularity="channel", scale_dtype="fp32"))


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 16])
def test_quantize_rows_rejects_other_bit_widths(bits):
    with pytest.raises(ValueError):
        quantize_rows(W, bits)


def test_dequantize_broadcasts_tensor_and_row_scales():
    codes = torch.tensor([[1, -1, 0], [-1, 0, 1]], dtype=torch.int8)
    # per tensor 0.5 -> [[0.5, -0.5, 0], [-0.5, 0, 0.5]]
    assert dequantize(codes, torch.tensor([0.5])).tolist() == [[0.5, -0.5, 0.0], [-0.5, 0.0, 0.5]]
    # per row [2, 3] -> [[2, -2, 0], [-3, 0, 3]]
    assert dequantize(codes, torch.tensor([2.0, 3.0])).tolist() == [[2.0, -2.0, 0.0], [-3.0, 0.0, 3.0]]


def test_weight_format_rounds_scale_to_scale_dtype():
    # int8 row scale of row [1.0, 0.3]: 1/127 = 0.007874015...; fp16 nearest is 0.0078735352
    w = torch.tensor([[1.0, 0.3]])
    _, s32 = WeightFormat("int8", scale_dtype="fp32").quantize(w)
    _, s16 = WeightFormat("int8", scale_dtype="fp16").quantize(w)
    assert close(s32, [1 / 127], tol=1e-9)
    assert s16.dtype == torch.float32 and s16.item() == torch.tensor(1 / 127).half().float().item()
    assert s16.item() != s32.item()


def test_qtensor_from_float_round_trips_absmean_dequantized_values():
    qt = QTensor.from_float(W, WeightFormat("ternary", "absmean", "tensor", "fp32"))
    # codes [[1,-1,0],[-1,0,1]] * 0.65
    assert close(qt.dequantize(), [[0.65, -0.65, 0.0], [-0.65, 0.0, 0.65]])


# ------------------------------------------------------------------ activations

def test_quantize_activations_int8_per_token_hand_computed():
    # token 0: max|x| = 1.0 -> s = 127:   0.3*127 = 38.1 -> 38, -1 -> -127, 0.25*127 = 31.75 -> 32
    #          dequantized: 38/127 = 0.299213, -1.0, 32/127 = 0.251969
    # token 1: max|x| = 2.0 -> s = 63.5:  2 -> 127, 0.01*63.5 = 0.635 -> 1, -0.3*63.5 = -19.05 -> -19
    #          dequantized: 2.0, 1/63.5 = 0.015748, -19/63.5 = -0.299213
    x = torch.tensor([[0.3, -1.0, 0.25], [2.0, 0.01, -0.3]])
    y = quantize_activations_int8(x)
    assert close(y, [[0.299213, -1.0, 0.251969], [2.0, 0.015748, -0.299213]], tol=1e-6)
    assert close(y, [[38 / 127, -1.0, 32 / 127], [2.0, 1 / 63.5, -19 / 63.5]], tol=1e-6)


def test_quantize_activations_int8_zero_token_and_batch_dims():
    # a zero token stays zero (the scale is clamped, no inf/nan); leading dims are all "tokens"
    x = torch.zeros(2, 3, 4)
    x[1, 2] = torch.tensor([0.5, -0.25, 0.125, 0.0])   # s = 254: 127, -63.5 -> -64 (half to even), 31.75 -> 32
    y = quantize_activations_int8(x)
    assert torch.isfinite(y).all()
    assert y[0].abs().sum() == 0
    assert close(y[1, 2], [0.5, -64 / 254, 32 / 254, 0.0])


def test_quantize_activations_int8_gradient_is_identity():
    x = torch.tensor([[0.3, -1.0, 0.25], [2.0, 0.01, -0.3]], requires_grad=True)
    c = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    (quantize_activations_int8(x) * c).sum().backward()
    assert torch.equal(x.grad, c)


# ------------------------------------------------------------------ straight-through estimator

@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_ste_forward_value(lam):
    w = torch.tensor([0.3, -0.7, 1.2])
    q = torch.tensor([0.0, -1.0, 1.0])
    # q - w = [-0.3, -0.3, -0.2]; w + lam*(q - w):
    expected = {0.0: [0.3, -0.7, 1.2], 0.25: [0.225, -0.775, 1.15],
                0.5: [0.15, -0.85, 1.1], 1.0: [0.0, -1.0, 1.0]}[lam]
    assert close(ste(w, q, lam), expected)


def test_ste_lambda_zero_is_exactly_the_float_weight():
    w = torch.tensor([0.3, -0.7, 1.2])
    assert torch.equal(ste(w, torch.tensor([0.0, -1.0, 1.0]), 0.0), w)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_ste_gradient_is_identity_wrt_w_and_none_for_q(lam):
    w = torch.tensor([0.3, -0.7, 1.2], requires_grad=True)
    q = torch.tensor([0.0, -1.0, 1.0], requires_grad=True)
    c = torch.tensor([2.0, -3.0, 0.5])
    (ste(w, q, lam) * c).sum().backward()
    assert torch.equal(w.grad, c)      # d/dw of (w + lam*stopgrad(q - w)) . c == c
    assert q.grad is None              # nothing flows into the quantized value


def test_weight_format_fake_gradient_is_straight_through():
    w = torch.tensor([[0.8, -0.4, 0.1], [-2.0, 0.2, 0.4]], requires_grad=True)
    fmt = WeightFormat("ternary", "absmean", "tensor", "fp32")
    fq = fmt.fake(w, 1.0)
    # forward sees codes * 0.65
    assert close(fq, [[0.65, -0.65, 0.0], [-0.65, 0.0, 0.65]])
    c = torch.arange(6.0).reshape(2, 3)
    (fq * c).sum().backward()
    assert torch.equal(w.grad, c)


@pytest.mark.parametrize("kind,granularity", [("int8", "tensor"), ("int4", "tensor"), ("int2", "tensor"),
                                              ("ternary", "channel")])
def test_embedding_quantizes_looked_up_rows_like_the_table(kind, granularity):
    """The per-row shortcut in FakeQuantEmbedding must equal fake-quantizing the whole table."""
    from tritpress.compressor.layers import FakeQuantEmbedding, WeightFormat

    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 12, padding_idx=0)
    fmt = WeightFormat(kind, granularity=granularity)
    fq = FakeQuantEmbedding(emb, fmt)
    fq.lam = 0.7
    ids = torch.randint(0, 50, (3, 9))
    out = fq(ids)
    out.pow(2).sum().backward()
    grad_fast = emb.weight.grad.clone()
    emb.weight.grad = None
    ref = torch.nn.functional.embedding(ids, fmt.fake(emb.weight, 0.7), 0)
    ref.pow(2).sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(grad_fast, emb.weight.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", [WeightFormat("int8"), WeightFormat("ternary"),
                                 WeightFormat("ternary", granularity="channel"), WeightFormat("int2")])
def test_large_weights_quantize_and_apply_in_slices_with_the_same_result(fmt, monkeypatch):
    """convert() quantizes a row-scaled table a slice of rows at a time, and QLinear applies a large weight a
    slice of output rows at a time (SmolLM2's 49k-row head): same codes and scales, same outputs."""
    import tritpress.compressor.layers as layers
    from tritpress.compressor.layers import QLinear

    g = torch.Generator().manual_seed(0)
    w, x, bias = torch.randn(300, 48, generator=g), torch.randn(2, 5, 48, generator=g), torch.randn(300, generator=g)
    whole = QTensor.from_float(w, fmt)
    lin = QLinear(whole, torch.nn.Parameter(bias))
    ref = lin(x)
    monkeypatch.setattr(layers, "CONVERT_SLICE_BYTES", 48 * 4 * 7)   # 7 rows a slice, the last one shorter
    monkeypatch.setattr(layers, "DEQUANT_SLICE_BYTES", 48 * 4 * 11)
    sliced = QTensor.from_float(w, fmt)
    assert torch.equal(sliced.codes, whole.codes) and torch.equal(sliced.scale, whole.scale)
    out = QLinear(sliced, torch.nn.Parameter(bias))(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ grouped scales (--group-size)

@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["int8", "int4", "int2"]), st.sampled_from([16, 32, 64]), st.integers(1, 5),
       st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_grouped_format_quantizes_each_group_as_a_row(kind, group, rows, groups, seed):
    """A scale per `group` weights of a row: exactly the per-row quantizer applied to each group, the
    same codes convert stores and QAT's fake weight computes, dequantized group by group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, group * groups, generator=g) * torch.rand(rows, group * groups, generator=g) * 4
    fmt = WeightFormat(kind, scale_dtype="fp32", group_size=group)
    codes, scale = fmt.quantize(w)
    ref_codes, ref_scale = WeightFormat(kind, scale_dtype="fp32").quantize(w.reshape(-1, group))
    assert codes.shape == w.shape and scale.shape == (rows, groups)
    assert torch.equal(codes.reshape(-1, group), ref_codes) and torch.equal(scale.reshape(-1), ref_scale)
    expected = (ref_codes.float() * ref_scale[:, None]).reshape(w.shape)
    assert torch.equal(QTensor.from_float(w, fmt).dequantize(), expected)
    assert torch.equal(fmt.fake(w), expected)


def test_rows_that_are_not_whole_groups_keep_one_scale_per_row():
    w = torch.randn(3, 40)   # 40 is not a multiple of 16: an LSTM's 650-wide rows are the real case
    _, scale = WeightFormat("int4", group_size=16).quantize(w)
    assert scale.shape == (3,)
    assert QTensor.empty((3, 40), WeightFormat("int4", group_size=16)).scale.shape == (3,)
    assert QTensor.empty((3, 64), WeightFormat("int4", group_size=16)).scale.shape == (3, 4)
    with pytest.raises(ValueError, match="group_size=24"):
        TernaryConfig(group_size=24)


def test_groups_cut_the_int4_error_of_rows_with_outliers():
    """What the scales buy: one outlier per row sets the whole row's int4 step; per 32 weights, one group's."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 7] *= 20
    err = lambda fmt: (QTensor.from_float(w, fmt).dequantize() - w).pow(2).mean()  # noqa: E731
    assert err(WeightFormat("int4", group_size=32)) < 0.2 * err(WeightFormat("int4"))


def test_grouped_embedding_gathers_the_dequantized_rows():
    from tritpress.compressor.layers import QEmbedding
    torch.manual_seed(0)
    table = torch.randn(50, 64)
    qt = QTensor.from_float(table, WeightFormat("int4", group_size=16))
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(QEmbedding(qt)(ids), qt.dequantize()[ids])
