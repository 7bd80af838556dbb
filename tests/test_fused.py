"""Fused (compiled) QAT kernels against their eager selves, the distillation loss against the
formula it replaced, the bf16 teacher, and the fallback when torch.compile cannot run."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tritpress.compressor import fused
from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.fused import fused_active, fused_kernels
from tritpress.compressor.layers import WeightFormat, fake_values
from tritpress.compressor.quantize import int8_token_values
from tritpress.compressor.structure import discover
from tritpress.compressor.train import TrainConfig, logit_losses, student_vocabulary, train_qat
from tritpress.compressor.transform import prepare
from tests.tiny_models import build

FORMATS = [("ternary", "absmean", "tensor"), ("ternary", "absmean", "channel"), ("ternary", "twn", "channel"),
           ("int8", "absmean", "tensor"), ("int4", "absmean", "tensor"), ("int2", "absmean", "tensor")]


def compiled(fn, *args):
    with fused_kernels(True):
        assert fused_active()
        return fn(*args)


def near_boundary(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Where a value sits within float rounding of a .5 rounding boundary (a reduction summed in
    another order may round it the other way)."""
    frac = (values - values.floor() - 0.5).abs()
    return frac < 1e-4 * levels.abs().clamp(min=1)


@pytest.mark.parametrize("kind, method, granularity", FORMATS)
def test_compiled_fake_weights_equal_eager(kind, method, granularity):
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.linspace(0.2, 3, 96)[:, None]
    eager = fake_values.eager(w, kind, method, granularity, "fp16")
    fast = compiled(fake_values, w, kind, method, granularity, "fp16")
    assert fast.shape == eager.shape and fast.dtype == eager.dtype
    torch.testing.assert_close(fast, eager, rtol=1e-6, atol=1e-6)
    # the values are exactly what convert() stores
    codes, scale = WeightFormat(kind, method, granularity).quantize(w)
    stored = codes.float() * (scale[:, None] if scale.numel() > 1 else scale)
    torch.testing.assert_close(fast, stored, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["int4", "int2"])
def test_compiled_grouped_fake_weights_equal_eager(kind):
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.linspace(0.2, 3, 64)   # each group of 16 its own range
    eager = fake_values.eager(w, kind, "absmean", "tensor", "fp16", 16)
    fast = compiled(fake_values, w, kind, "absmean", "tensor", "fp16", 16)
    torch.testing.assert_close(fast, eager, rtol=1e-6, atol=1e-6)
    codes, scale = WeightFormat(kind, group_size=16).quantize(w)
    torch.testing.assert_close(fast, codes.float() * scale.repeat_interleave(16, dim=1), rtol=1e-6, atol=1e-6)


def test_compiled_kernels_take_any_shape():
    for rows in (3, 17, 64, 130):
        x = torch.randn(2, rows, 40)
        torch.testing.assert_close(compiled(int8_token_values, x), int8_token_values.eager(x), rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 70), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_compiled_int8_activations_equal_eager(tokens, width, magnitude, seed):
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed)) * magnitude
    eager = int8_token_values.eager(x)
    fast = compiled(int8_token_values, x)
    step = x.abs().amax(-1, keepdim=True) / 127
    scaled = x / step
    differ = (fast - eager).abs() > 1e-5 * step
    # a level apart only where x sits on a rounding boundary (the scale's division rounds differently)
    assert not (differ & ~near_boundary(scaled, scaled)).any()
    assert ((fast - eager).abs() <= step * 1.001).all()


def reference_losses(s, t, target, T):
    """The formula QAT used before the fused kernel: F.kl_div + F.cross_entropy."""
    kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
    return kd, F.cross_entropy(s, target)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("fast", [False, True])
def test_logit_losses_equal_kl_div_and_cross_entropy_with_gradients(T, fast):
    torch.manual_seed(0)
    s = (torch.randn(40, 300) * 3).requires_grad_()
    t = torch.randn(40, 300) * 3
    target = torch.randint(0, 300, (40,))
    target[::5] = -100
    kd_ref, ce_ref = reference_losses(s, t, target, T)
    (0.7 * kd_ref + 0.3 * ce_ref).backward()
    grad_ref, s.grad = s.grad.clone(), None
    kd, ce = compiled(logit_losses, s, t, target, T) if fast else logit_losses(s, t, target, T)
    (0.7 * kd + 0.3 * ce).backward()
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.grad, grad_ref, rtol=1e-4, atol=1e-8)
    assert logit_losses(s, t, None, T)[1] is None


def test_trimmed_vocabulary_targets_are_renumbered_not_lost():
    """A trimmed student scores dropped ids -inf: KD and CE run over the produced ids, each target
    renumbered to its column there; the CE equals the full-vocabulary CE with dropped targets ignored."""
    torch.manual_seed(1)
    s_full = torch.randn(2, 6, 50)
    produced = torch.rand(50) > 0.3
    s_full[..., ~produced] = float("-inf")
    t_full = torch.randn(2, 6, 50)
    ids = torch.randint(0, 50, (2, 6))
    s_kd, t_kd, mask = student_vocabulary(s_full, t_full)
    assert torch.equal(mask, produced)
    from tritpress.compressor.train import distill_targets
    target = distill_targets(torch.cat([ids[:, 1:], ids.new_full((2, 1), -100)], 1).flatten(), mask)
    _, ce = logit_losses(s_kd.flatten(0, -2), t_kd.flatten(0, -2), target, 1.0)
    full_target = ids[:, 1:].flatten().masked_fill(~produced[ids[:, 1:].flatten()], -100)
    torch.testing.assert_close(ce, F.cross_entropy(s_full[:, :-1].flatten(0, 1), full_target))


def _train(cfg_kw, steps=4):
    teacher = build("llama_tied")
    student = prepare(copy.deepcopy(teacher), TernaryConfig(act_bits=8))
    torch.manual_seed(0)
    blocks = torch.randint(0, teacher.config.vocab_size, (8, 16))
    cfg = TrainConfig(steps=steps, seq_len=16, batch_size=4, lr=1e-3, checkpoint_every=0, **cfg_kw).resolved(10_000)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        findings = train_qat(student, teacher, discover(teacher), blocks, cfg, d).findings
    return student, findings


def test_fused_training_matches_eager_training():
    eager, f_eager = _train({"fused": "off"})
    fast, f_fast = _train({"fused": "on"})
    assert f_fast["fused_kernels"] is True and f_eager["fused_kernels"] is False
    for a, b in zip(f_eager["curve"], f_fast["curve"]):
        for k in ("loss", "kd", "task", "hidden"):
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-5), (k, a, b)
    for (n, p), q in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=n)
    assert not fused_active()  # the run's fused block ended with it


def test_auto_compiles_long_runs_only():
    assert not TrainConfig(steps=199).fuses and TrainConfig(steps=200).fuses
    assert not TrainConfig(steps=5000, fused="off").fuses and TrainConfig(steps=2, fused="on").fuses
    assert not TrainConfig(steps=5000, stop_after=10).fuses  # what this process runs
    with pytest.raises(ValueError, match="fused"):
        TrainConfig(fused="maybe")
    with pytest.raises(ValueError, match="teacher_dtype"):
        TrainConfig(teacher_dtype="fp8")


def test_bf16_teacher_distills_close_to_the_fp32_one():
    _, f32 = _train({"quant_schedule": "none"}, steps=2)
    _, f16 = _train({"quant_schedule": "none", "teacher_dtype": "bf16"}, steps=2)
    assert f16["teacher_dtype"] == "bf16"
    first32, first16 = f32["curve"][0], f16["curve"][0]
    assert first16["task"] == pytest.approx(first32["task"], rel=1e-6)  # the student's own loss: fp32 both
    assert first32["kd"] > 1e-4 and first32["hidden"] > 0.01
    assert first16["kd"] == pytest.approx(first32["kd"], rel=0.05)
    assert first16["hidden"] == pytest.approx(first32["hidden"], rel=0.05)


def test_a_compile_failure_falls_back_to_eager_once(monkeypatch):
    monkeypatch.setattr(fused, "_state", {"on": False, "broken": None})

    def no_compiler(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)

    @fused.fusable
    def double(x):
        return x * 2

    x = torch.ones(3)
    with warnings.catch_warnings(record=True) as caught, fused_kernels(True):
        warnings.simplefilter("always")
        assert torch.equal(double(x), x * 2)
        assert torch.equal(double(x), x * 2)
        assert not fused_active()
    assert len([w for w in caught if "fused kernels unavailable" in str(w.message)]) == 1
    assert "no C++ compiler found" in fused.fusion_failure() and "second line" not in fused.fusion_failure()
    with fused_kernels(True):
        assert not fused_active()  # given up for the process


def test_a_kernel_error_is_raised_not_taken_for_a_compile_failure(monkeypatch):
    monkeypatch.setattr(fused, "_state", {"on": False, "broken": None})

    @fused.fusable
    def add(x, y):
        return x + y

    with fused_kernels(True), pytest.raises(RuntimeError):
        add(torch.ones(3), torch.ones(4))  # shapes that do not broadcast: an error in eager too
    assert fused.fusion_failure() is None


def test_one_input_read_by_several_layers_is_quantized_once_with_the_same_gradients():
    """q/k/v projections read one tensor: quantized once (the same tensor object back), gradients
    equal to quantizing it per layer; an in-place change or another tensor is quantized afresh."""
    from tritpress.compressor.layers import FakeQuantLinear

    torch.manual_seed(0)
    layers = [FakeQuantLinear(torch.nn.Parameter(torch.randn(5, 8)), None, WeightFormat("ternary"), act_bits=8)
              for _ in range(3)]
    x = torch.randn(4, 8, requires_grad=True)
    from tritpress.compressor.layers import layer_input
    h = x * 1.0
    assert layer_input(h, 8) is layer_input(h, 8)
    sum(layer(h).pow(2).sum() for layer in layers).backward()
    shared = x.grad.clone()
    x.grad = None
    sum(layer(x * 1.0).pow(2).sum() for layer in layers).backward()  # a fresh tensor per layer
    torch.testing.assert_close(shared, x.grad, rtol=0, atol=0)
    with torch.no_grad():
        h = torch.randn(4, 8)
        before = layer_input(h, 8)
        h.mul_(3)
        after = layer_input(h, 8)
    assert after is not before
    torch.testing.assert_close(after, int8_token_values.eager(h))
    with torch.inference_mode():  # inference tensors have no version counter: quantized every time
        h = torch.randn(4, 8)
        torch.testing.assert_close(layers[0](h), layers[0](h.clone()))
        torch.testing.assert_close(layer_input(h, 8), int8_token_values.eager(h))
