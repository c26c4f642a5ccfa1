"""MixDPOTrainer on a tiny GPT-NeoX in about 20 lines: the drop-in for TRL's DPOTrainer.

Shows: a tiny model built from a config, a tokenizer trained in memory, the synthetic pluralistic task (TRL's
prompt/chosen/rejected format, 50 groups x 4 annotators whose labels agree with the oracle 80% of the time), and
MixDPOConfig/MixDPOTrainer used exactly like DPOConfig/DPOTrainer, with a LogNormal strength whose mean is pinned
at DPO's beta and whose spread is refitted on every pair's cached margin. (A free mean can run off to a large
E[beta] on a short run; the pluralistic benchmark finds it no better than DPO with a tuned beta.) Everything runs
offline on the CPU.
Takes: about 40 s on 2 CPU cores.
Prints: the fitted strength's E[beta] (0.300, pinned), its CV and sd of log beta, and the trained policy's held-out oracle accuracy next to the
annotators' own label accuracy (the policy agrees with the oracle more often than the labels it learned from).
"""

import copy

import numpy as np
import torch

from alignment import MixDPOConfig, MixDPOTrainer, evaluate, synthetic
from alignment.metrics import oracle_accuracy
from alignment.strength_fit import sd_log_strength

torch.manual_seed(0)
task = synthetic.benchmark_task(1.0, "strength", seed=0, n_train=800, n_validation=100, n_test=500)
texts = synthetic.task_texts(task.train)
tokenizer = synthetic.build_tokenizer(texts)
model = synthetic.tiny_gpt_neox(tokenizer, seed=0)
synthetic.pretrain(model, tokenizer, texts, steps=150, seed=0, progress=False)

args = MixDPOConfig(output_dir="examples-out/tiny-mixdpo", strength="lognormal", strength_fix_mean=True,
                    strength_update="refit",
                    beta=0.3, learning_rate=5e-4, max_steps=100, per_device_train_batch_size=16,
                    use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                    precompute_ref_log_probs=True, lr_scheduler_type="cosine", disable_tqdm=True)
trainer = MixDPOTrainer(model=copy.deepcopy(model), ref_model=model, args=args, train_dataset=task.train,
                        processing_class=tokenizer)
trainer.train()

pairs = evaluate(trainer.model, model, task.test, tokenizer)["pairs"]
acc = oracle_accuracy(pairs["margin"].to_numpy(), np.asarray(task.test["oracle_margin"]))["accuracy"]
s = trainer.strength
print(f"fitted strength: E[beta] {float(s.mean()):.3f}, CV {float(s.cv()):.3f}, "
      f"sd of log beta {sd_log_strength(s):.3f}")
print(f"held-out oracle accuracy {acc:.3f}; the annotators' label accuracy {task.label_accuracy['test']:.3f}")
