"""DPO and MixDPO losses (alignment.losses): DPO identities (ours and TRL's), objectives, dtypes, validation."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import mpmath
import pytest
import torch
import torch.nn.functional as F

from alignment import (
    OBJECTIVES,
    GammaStrength,
    LogNormalStrength,
    PointStrength,
    dpo_loss,
    make_strength,
    mixdpo_loss,
)

F64 = torch.float64


def _logps(n=64, seed=0, dtype=F64, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    # Summed sequence log-probs: large negative numbers whose differences are O(scale).
    base = -200.0 + 50.0 * torch.randn(n, dtype=F64, generator=g)
    return tuple((base + scale * torch.randn(n, dtype=F64, generator=g)).to(dtype) for _ in range(4))


# --------------------------------------------------------------------------------------------- DPO identities
def test_point_strength_is_dpo_to_1e12():
    pc, pr, rc, rr = _logps()
    h = (pc - rc) - (pr - rr)
    assert 5 < float((0.25 * h).abs().max()) < 20  # the kernel's softplus is exact below 20 (next test)
    for beta in (0.1, 0.25):
        ours, cr, rj = mixdpo_loss(pc, pr, rc, rr, strength=PointStrength(beta))
        dpo, dcr, drj = dpo_loss(pc, pr, rc, rr, beta=beta)
        assert float((ours - dpo).abs().max()) <= 1e-12
        assert float((ours + F.logsigmoid(beta * h)).abs().max()) <= 1e-12
        assert torch.equal(cr, dcr) and torch.equal(rj, drj)
        assert torch.equal(cr, beta * (pc - rc))
        # label smoothing: the conservative-DPO form
        ls, _, _ = mixdpo_loss(pc, pr, rc, rr, strength=PointStrength(beta), label_smoothing=0.2)
        ref = -0.8 * F.logsigmoid(beta * h) - 0.2 * F.logsigmoid(-beta * h)
        assert float((ls - ref).abs().max()) <= 1e-12
        assert float((dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)[0] - ref).abs().max()) <= 1e-12
    # the two objectives coincide for a point mass
    exp_obj, _, _ = mixdpo_loss(pc, pr, rc, rr, strength=PointStrength(0.1), objective="expected")
    assert float((exp_obj - dpo_loss(pc, pr, rc, rr)[0]).abs().max()) <= 1e-12


def test_point_strength_on_badly_misranked_pairs():
    # torch's softplus returns x itself above its threshold (default 20, off by ~2e-9 in float64); the kernel
    # raises the threshold for float64, so badly misranked pairs (beta h << 0) still match DPO to 1e-12.
    h = torch.tensor([-21.0, -30.0, -36.0, -100.0, -1e3], dtype=F64)
    zero = torch.zeros_like(h)
    ours = mixdpo_loss(h, zero, zero, zero, strength=PointStrength(1.0))[0]
    exact = torch.tensor([float(-mpmath.log(1 / (1 + mpmath.exp(-mpmath.mpf(float(x)))))) for x in h], dtype=F64)
    assert float((ours - exact).abs().max()) <= 1e-12


def _trl_sigmoid_loss(beta, pc, pr, rc, rr):
    """TRL 1.16's own DPO loss on four log-prob tensors.

    TRL computes the sigmoid loss inside ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` (there is no
    standalone loss function in 1.16). We call that unbound method on a stand-in object with the attributes it
    reads, and a stand-in model whose per-token log-probs sum exactly to the given sequence log-probs (one
    nonzero token; adding zeros is exact), with precomputed reference log-probs. Returns (mean loss, metrics).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trl.trainer import dpo_trainer

    b, length = pc.shape[0], 3
    per_token = torch.zeros(2 * b, length - 1, dtype=pc.dtype)
    per_token[:, 0] = torch.cat([pc, pr])

    class Model:
        training = True

        def __call__(self, **kwargs):
            return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                   mean_logits=torch.zeros_like(per_token),
                                   is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    def identity(x):  # one process: gathering is the identity
        return x

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity)
    stand_in = SimpleNamespace(
        model=Model(), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * b, length, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, length, dtype=torch.long),
        "completion_mask": torch.tensor([[0] + [1] * (length - 1)] * (2 * b)),
        "ref_chosen_logps": rc, "ref_rejected_logps": rr,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(stand_in, stand_in.model, inputs, False)
    return loss, stand_in._metrics["train"]


def test_point_strength_matches_trl_dpo_loss_to_1e12():
    pc, pr, rc, rr = _logps(n=16, seed=1)
    ours, cr, rj = mixdpo_loss(pc, pr, rc, rr, strength=PointStrength(0.1))
    # per example (a batch of one: TRL's mean is the example's loss)
    for i in range(len(pc)):
        trl_loss, _ = _trl_sigmoid_loss(0.1, pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1])
        assert trl_loss.dtype == F64
        assert abs(float(trl_loss) - float(ours[i])) <= 1e-12
    # whole batch: the mean loss and TRL's logged reward metrics
    trl_loss, metrics = _trl_sigmoid_loss(0.1, pc, pr, rc, rr)
    assert abs(float(trl_loss) - float(ours.mean())) <= 1e-12
    assert abs(metrics["rewards/chosen"][0] - float(cr.mean())) <= 1e-12
    assert abs(metrics["rewards/rejected"][0] - float(rj.mean())) <= 1e-12
    assert abs(metrics["rewards/margins"][0] - float((cr - rj).mean())) <= 1e-12


# --------------------------------------------------------------------------------------------- MixDPO
def test_rewards_use_the_mean_strength():
    pc, pr, rc, rr = _logps()
    for s in (LogNormalStrength(mu=-2.0, sigma=0.8), GammaStrength(3.0, 10.0)):
        _, cr, rj = mixdpo_loss(pc, pr, rc, rr, strength=s)
        mean = float(s.mean().detach())
        assert torch.allclose(cr, mean * (pc - rc), rtol=1e-15) and torch.allclose(rj, mean * (pr - rr), rtol=1e-15)
        assert not cr.requires_grad


def test_marginal_and_expected_objectives_differ_by_jensen():
    pc, pr, rc, rr = _logps()
    for s in (LogNormalStrength(mu=-2.0, sigma=1.0, integrator="quadrature"), GammaStrength(1.5, 15.0),
              GammaStrength(1.5, 15.0, integrator="quadrature")):
        marginal, _, _ = mixdpo_loss(pc, pr, rc, rr, strength=s, objective="marginal")
        expected, _, _ = mixdpo_loss(pc, pr, rc, rr, strength=s, objective="expected")
        gap = expected - marginal
        assert bool((gap > 0).all())  # strict for a non-degenerate strength
        assert float(gap.mean().detach()) > 1e-3
    # Gamma's closed-form "expected" objective agrees with the quadrature rule
    closed = mixdpo_loss(pc, pr, rc, rr, strength=GammaStrength(1.5, 15.0), objective="expected")[0]
    quad = mixdpo_loss(pc, pr, rc, rr, strength=GammaStrength(1.5, 15.0, integrator="quadrature"),
                       objective="expected")[0]
    assert torch.allclose(closed, quad, rtol=1e-8, atol=1e-10)


def test_gradients_reach_policy_and_strength():
    pc, pr, rc, rr = _logps()
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    for name, kw in [("lognormal", {}), ("lognormal", {"integrator": "mc"}), ("gamma", {}),
                     ("gamma", {"integrator": "mc"})]:
        s = make_strength(name, **kw)
        losses, _, _ = mixdpo_loss(pc, pr, rc, rr, strength=s)
        grads = torch.autograd.grad(losses.mean(), [pc, pr, *s.parameters()])
        assert all(torch.isfinite(g).all() and float(g.abs().sum()) > 0 for g in grads)
        # the policy gradient pushes the chosen log-prob up and the rejected one down
        assert bool((grads[0] < 0).all() and (grads[1] > 0).all())


@pytest.mark.parametrize("name,kw", [("lognormal", {}), ("lognormal", {"integrator": "quadrature"}),
                                     ("gamma", {}), ("gamma", {"integrator": "quadrature"})])
def test_loss_gradients_pass_gradcheck(name, kw):
    """Analytic gradients of the loss in the policy log-probs and the strength's parameters equal finite
    differences (float64, deterministic integrators)."""
    pc, pr, rc, rr = (t[:6] for t in _logps())
    s = make_strength(name, **kw)
    policy = (pc.clone().requires_grad_(True), pr.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: mixdpo_loss(a, b, rc, rr, strength=s)[0], policy, eps=1e-6,
                                    atol=1e-7, rtol=1e-5)
    # In the strength's parameters: the module's forward is log E[sigmoid(beta h)], the loss's negative.
    h = ((pc - rc) - (pr - rr)).detach()
    names = [n for n, _ in s.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in s.parameters())
    assert torch.autograd.gradcheck(lambda *v: torch.func.functional_call(s, dict(zip(names, v)), (h,)), params,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_low_precision_inputs_are_upcast():
    logps64 = _logps(scale=3.0)
    for s in (LogNormalStrength(), GammaStrength()):
        ref, _, _ = mixdpo_loss(*logps64, strength=s)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            low = tuple(t.to(dtype) for t in logps64)
            losses, cr, _ = mixdpo_loss(*low, strength=s)
            assert losses.dtype == torch.float32 and cr.dtype == torch.float32
            # the only loss of precision is the rounding of the inputs themselves
            exact_on_rounded, _, _ = mixdpo_loss(*(t.double() for t in low), strength=s)
            assert torch.allclose(losses.double(), exact_on_rounded, rtol=1e-5, atol=1e-6)
        assert torch.allclose(mixdpo_loss(*(t.float() for t in logps64), strength=s)[0].double(), ref,
                              rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------- validation
def test_bad_input_is_a_clear_error():
    pc, pr, rc, rr = _logps(n=6)
    s = LogNormalStrength()
    with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(5,\) but policy_chosen_logps has"):
        mixdpo_loss(pc, pr[:5], rc, rr, strength=s)
    bad = pr.clone()
    bad[[1, 4]] = float("nan")
    bad_ref = rc.clone()
    bad_ref[3] = float("-inf")
    with pytest.raises(ValueError, match=r"policy_rejected_logps at batch indices \[1, 4\]; "
                                         r"ref_chosen_logps at batch indices \[3\]"):
        mixdpo_loss(pc, bad, bad_ref, rr, strength=s)
    with pytest.raises(ValueError, match=r"non-finite log-probabilities: policy_chosen_logps at batch indices \[0\]"):
        dpo_loss(torch.cat([torch.tensor([float("inf")], dtype=F64), pc[1:]]), pr, rc, rr)
    with pytest.raises(ValueError, match="unknown objective 'mean'; accepted: marginal, expected"):
        mixdpo_loss(pc, pr, rc, rr, strength=s, objective="mean")
    with pytest.raises(TypeError, match="strength must be an alignment Strength"):
        mixdpo_loss(pc, pr, rc, rr, strength=0.1)
    with pytest.raises(TypeError, match="ref_rejected_logps must be a torch.Tensor"):
        mixdpo_loss(pc, pr, rc, [1.0] * 6, strength=s)
    with pytest.raises(ValueError, match="floating-point"):
        mixdpo_loss(pc, pr, rc, rr.long(), strength=s)
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        mixdpo_loss(pc, pr, rc, rr, strength=s, label_smoothing=1.5)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_zero_dim_nan_is_named_without_indices():
    zero, nan = torch.tensor(0.0), torch.tensor(float("nan"))
    with pytest.raises(ValueError, match=r"^non-finite log-probabilities: policy_chosen_logps is nan$"):
        mixdpo_loss(nan, zero, zero, zero, strength=LogNormalStrength())
    with pytest.raises(ValueError, match=r"^non-finite log-probabilities: ref_rejected_logps is inf$"):
        dpo_loss(zero, zero, zero, torch.tensor(float("inf")))
    # 0-dim inputs that are finite give 0-dim results
    losses, cr, rj = mixdpo_loss(zero, zero, zero, zero, strength=LogNormalStrength())
    assert losses.shape == cr.shape == rj.shape == () and abs(float(losses.detach()) - math.log(2.0)) < 1e-7


@pytest.mark.parametrize("family,kw", [("point", {}), ("lognormal", {}), ("lognormal", {"integrator": "quadrature"}),
                                       ("lognormal", {"integrator": "mc"}), ("lognormal", {"integrator": "qmc"}),
                                       ("gamma", {}), ("gamma", {"integrator": "quadrature"}),
                                       ("gamma", {"integrator": "mc"})])
def test_empty_batch_gives_empty_losses_and_rewards(family, kw):
    empty = [torch.zeros(0, requires_grad=i < 2) for i in range(4)]
    strength = make_strength(family, **kw)
    for objective in OBJECTIVES:
        for eps in (0.0, 0.1):
            losses, cr, rj = mixdpo_loss(*empty, strength=strength, objective=objective, label_smoothing=eps)
            assert losses.shape == cr.shape == rj.shape == (0,) and losses.dtype == torch.float32
            losses.sum().backward()  # still part of the graph
    assert empty[0].grad.shape == (0,)


def _zeros(dtype=torch.float32, n=3):
    return [torch.zeros(n, dtype=dtype) for _ in range(4)]


def test_strength_beyond_the_working_dtype_is_a_clear_error_not_nan():
    # E[beta] = exp(100.125) = 3e43 is inf in float32 (largest 3.4e38): the rewards would be inf * 0 = NaN.
    with pytest.raises(ValueError, match=r"the lognormal strength \(mu=100, sigma=0.5\) has E\[beta\] = 3.046e\+43, "
                                         r"which is not finite in torch.float32 \(largest finite value 3.403e\+38\)"):
        mixdpo_loss(*_zeros(), strength=LogNormalStrength(mu=100.0))
    with pytest.raises(ValueError, match=r"\(mu=800, sigma=0.5\) has E\[beta\] = inf, which is not finite in "
                                         r"torch.float64 \(largest finite value 1.798e\+308\)"):
        mixdpo_loss(*_zeros(F64), strength=LogNormalStrength(mu=800.0))
    with pytest.raises(ValueError, match=r"gamma strength \(shape=2, rate=1e-40\) has E\[beta\] = 2e\+40"):
        mixdpo_loss(*_zeros(), strength=GammaStrength(shape=2.0, rate=1e-40))
    with pytest.raises(ValueError, match=r"point strength \(beta=1e\+40\) has E\[beta\] = 1e\+40"):
        mixdpo_loss(*_zeros(), strength=PointStrength(1e40))
    # The same strength is fine where the working dtype holds it: a zero margin costs log 2, the rewards are 0.
    losses, cr, rj = mixdpo_loss(*_zeros(F64), strength=LogNormalStrength(mu=100.0))
    assert torch.allclose(losses, torch.full((3,), math.log(2.0), dtype=F64), rtol=0, atol=1e-15)
    assert not cr.any() and not rj.any()
    # E[beta] finite, but E[beta] times a huge log-ratio is not: the rewards are named with their indices.
    pc = torch.tensor([1e10, -1e10, 5.0])
    with pytest.raises(ValueError, match=r"MixDPO chosen_rewards at batch indices \[0, 1\]: not finite in "
                                         r"torch.float32 with the lognormal strength \(mu=80, sigma=0.5\)"):
        mixdpo_loss(pc, *_zeros()[1:], strength=LogNormalStrength(mu=80.0))


@pytest.mark.parametrize("integrator", ["gauss-hermite", "quadrature", "mc", "qmc"])
def test_nodes_beyond_the_working_dtype_still_give_log_2_at_zero_margin(integrator):
    # E[beta] = exp(85.5) = 1.3e37 fits float32, but the far nodes exp(85 + 8.5) do not: inf * 0 must not be NaN.
    strength = LogNormalStrength(mu=85.0, sigma=1.0, integrator=integrator, nodes=128)
    logps = [torch.zeros(3, requires_grad=i < 2) for i in range(4)]
    for objective in OBJECTIVES:
        for eps in (0.0, 0.2):
            losses, cr, rj = mixdpo_loss(*logps, strength=strength, objective=objective, label_smoothing=eps)
            assert torch.allclose(losses, torch.full((3,), math.log(2.0)), rtol=0, atol=1e-6), losses
            assert not cr.any() and not rj.any()
            grads = torch.autograd.grad(losses.sum(), [logps[0], *strength.parameters()], allow_unused=True)
            assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


def test_a_sum_that_only_overflows_is_no_error():
    # Every entry is finite, but their float32 sum (the one check of the normal path) overflows.
    big = torch.tensor([2e38, 2e38])
    losses, cr, rj = mixdpo_loss(big, torch.zeros(2), torch.zeros(2), torch.zeros(2), strength=PointStrength(1.0))
    assert torch.equal(losses, torch.zeros(2)) and torch.equal(cr, big) and not rj.any()


# --------------------------------------------------------------------------------------------- package
def test_package_import_is_light_and_the_trainer_is_lazy():
    code = ("import sys, alignment; from alignment import *; "
            "heavy = [m for m in ('transformers', 'trl', 'datasets', 'accelerate') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import alignment

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alignment.nope  # noqa: B018
    if importlib.util.find_spec("alignment.trainer") is not None and importlib.util.find_spec("trl") is not None:
        from alignment import MixDPOTrainer
        from alignment.trainer import MixDPOTrainer as direct

        assert MixDPOTrainer is direct
