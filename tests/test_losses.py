"""DPO and MixDPO losses (alignment.losses): DPO identities (ours and TRL's), objectives, dtypes, validation."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import mpmath
import pytest
import torch
import torch.nn.functional as F

from alignment import GammaStrength, LogNormalStrength, PointStrength, dpo_loss, make_strength, mixdpo_loss

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
