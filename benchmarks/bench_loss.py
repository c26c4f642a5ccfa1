"""MixDPO loss cost against DPO's, side by side in one process.

1. The loss alone: forward + backward of ``mixdpo_loss`` for every strength and integrator against ``dpo_loss``
   on a batch of 64 pairs (median over interleaved repetitions).
2. A whole training step on a tiny causal LM (random GPT-NeoX from a config, no download): policy forward with
   gradients on chosen and rejected sequences, reference forward without, the loss, backward and an AdamW step
   (policy and strength parameters). DPO and MixDPO steps are interleaved so drift in machine load hits both.

The paper (arXiv 2601.06180) reports 1.02x (LogNormal, MC K = 16) and 1.1x (Gamma closed form) over DPO; the
targets here are at most 1.02x (LogNormal Gauss-Hermite) and 1.05x (Gamma closed form) for the whole step.

    python benchmarks/bench_loss.py [--reps-loss 300] [--reps-step 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from alignment import dpo_loss, make_strength, mixdpo_loss

CONFIGS = [
    ("point", "exact"),
    ("lognormal", "gauss-hermite"),
    ("lognormal", "quadrature"),
    ("lognormal", "mc"),
    ("lognormal", "qmc"),
    ("gamma", "closed-form"),
    ("gamma", "quadrature"),
    ("gamma", "mc"),
]
STEP_CONFIGS = [("lognormal", "gauss-hermite"), ("gamma", "closed-form"), ("lognormal", "mc"),
                ("lognormal", "quadrature")]


def _strength(family, integrator):
    return make_strength(family, integrator=None if integrator == "exact" else integrator)


def bench_loss(reps: int, batch: int = 64) -> dict[str, float]:
    """Median microseconds of forward + backward of the loss, per configuration."""
    g = torch.Generator().manual_seed(0)
    logps = [(-100.0 + 10.0 * torch.randn(batch, generator=g)).requires_grad_(i < 2) for i in range(4)]
    runs = {"dpo_loss": lambda: dpo_loss(*logps, beta=0.1)[0]}
    for family, integrator in CONFIGS:
        s = _strength(family, integrator)
        runs[f"{family}/{integrator}"] = lambda s=s: mixdpo_loss(*logps, strength=s)[0]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(20):  # warm-up
        for fn in runs.values():
            fn().mean().backward()
    order = list(runs.items())
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)  # interleaved, in a fresh order each round: no position bias
        for name, fn in order:
            t0 = time.perf_counter()
            fn().mean().backward()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def _tiny_lm(seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128)
    return GPTNeoXForCausalLM(cfg)


def _sequence_logps(model, input_ids, completion_mask):
    logits = model(input_ids=input_ids).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)


def bench_step(reps: int, pairs: int = 8, length: int = 64) -> tuple[dict[str, float], dict[str, float]]:
    """Whole DPO / MixDPO training steps on a tiny causal LM.

    Returns the median milliseconds per configuration, the median over rounds of the paired ratio
    (configuration / DPO within the same round, so slow drifts of the machine's load cancel), and the same paired
    ratio of the process's CPU time (what this process itself spent: the least disturbed by other processes on a
    shared machine).
    """
    policy, reference = _tiny_lm(0), _tiny_lm(0)
    reference.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(512, (2 * pairs, length), generator=g)  # [chosen..., rejected...]
    mask = torch.zeros(2 * pairs, length)
    mask[:, length // 2:] = 1.0  # completion = second half
    with torch.no_grad():
        ref = _sequence_logps(reference, ids, mask)
    ref_c, ref_r = ref[:pairs], ref[pairs:]
    strengths = {f"{f}/{i}": _strength(f, i) for f, i in STEP_CONFIGS}
    # "dpo (control)" is a second, identical DPO configuration: its ratio to "dpo" is the noise floor.
    opts = {"dpo": torch.optim.AdamW(policy.parameters(), lr=1e-6),
            "dpo (control)": torch.optim.AdamW(policy.parameters(), lr=1e-6)}
    for name, s in strengths.items():
        opts[name] = torch.optim.AdamW([{"params": policy.parameters()},
                                        {"params": s.parameters(), "lr": 1e-3}], lr=1e-6)

    def step(name):
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        logps = _sequence_logps(policy, ids, mask)
        pc, pr = logps[:pairs], logps[pairs:]
        with torch.no_grad():  # the reference forward is part of a step unless precomputed
            _sequence_logps(reference, ids, mask)
        if name.startswith("dpo"):
            losses = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)[0]
        else:
            losses = mixdpo_loss(pc, pr, ref_c, ref_r, strength=strengths[name])[0]
        losses.mean().backward()
        opt.step()

    names = list(opts)
    for _ in range(3):
        for n in names:
            step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    shuffle = random.Random(1).shuffle
    for _ in range(reps):
        shuffle(names)
        for n in names:
            t0, c0 = time.perf_counter(), time.process_time()
            step(n)
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)

    def paired(t):
        return {n: statistics.median(a / b for a, b in zip(t[n], t["dpo"])) for n in t}

    return {n: 1e3 * statistics.median(v) for n, v in times.items()}, paired(times), paired(cpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps-loss", type=int, default=300)
    ap.add_argument("--reps-step", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared machine a second thread makes small-tensor "
                         "timings erratic; 0 keeps torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, os.cpu_count() = {os.cpu_count()}")
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f}")
    except OSError:
        pass

    t0 = time.perf_counter()
    loss = bench_loss(args.reps_loss)
    base = loss["dpo_loss"]
    print(f"\n1. Loss forward + backward, batch 64, float32, median of {args.reps_loss} interleaved reps")
    print(f"{'loss':28s} {'us':>9s} {'x dpo_loss':>11s}")
    for name, us in loss.items():
        print(f"{name:28s} {us:9.1f} {us / base:11.2f}")

    step, paired, paired_cpu = bench_step(args.reps_step)
    dpo = step["dpo"]
    print(f"\n2. Whole training step, tiny GPT-NeoX (2 layers, hidden 64), 8 pairs x 64 tokens, median of "
          f"{args.reps_step} interleaved reps")
    print("   x DPO: ratio of wall-clock medians; paired: median of per-round wall ratios; cpu: the same for the"
          "\n   process's CPU time; loss-only: 1 + (MixDPO loss - DPO loss time, part 1) / DPO step time")
    print(f"{'step':28s} {'ms':>9s} {'x DPO':>8s} {'paired':>8s} {'cpu':>8s} {'loss-only':>10s} {'target':>8s}")
    targets = {"lognormal/gauss-hermite": 1.02, "gamma/closed-form": 1.05}
    for name, ms in step.items():
        # The loss-only estimate adds the measured loss overhead to the DPO step: less noisy than the ratio of
        # two step medians when the machine is shared.
        est = 1.0 if name.startswith("dpo") else 1.0 + (loss[name] - loss["dpo_loss"]) / (1e3 * dpo)
        tgt = f"<= {targets[name]:.2f}" if name in targets else ""
        print(f"{name:28s} {ms:9.2f} {ms / dpo:8.3f} {paired[name]:8.3f} {paired_cpu[name]:8.3f} {est:10.4f} "
              f"{tgt:>8s}")
    try:
        print(f"\nload average after: {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s")
    except OSError:
        pass


if __name__ == "__main__":
    main()
