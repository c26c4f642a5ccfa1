"""A tiny causal LM for CPU runs, built from a config (nothing is fetched from a model hub).

:func:`tiny_gpt_neox` builds a small GPT-NeoX (Pythia's architecture) for a tokenizer, and :func:`pretrain`
briefly trains it on texts (next-token loss), so that preference optimization starts from a model that already
writes the task's language. Re-exported by :mod:`alignment.synthetic`, the task these models learn.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pretrain", "tiny_gpt_neox"]


def tiny_gpt_neox(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    max_positions: int = 64,
):
    """A tiny GPT-NeoX (Pythia's architecture) built from a config, randomly initialised with ``seed``.

    Args:
        tokenizer: gives the vocabulary size and the pad/eos ids.
        hidden_size, num_layers, num_heads: model width, depth and attention heads.
        seed: seed of the weight initialisation.
        max_positions: maximum sequence length in tokens.

    Returns:
        ``transformers.GPTNeoXForCausalLM`` in float32, in train mode.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def pretrain(
    model,
    tokenizer,
    texts: Sequence[str],
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Briefly pretrain a causal LM on ``texts`` (next-token loss, AdamW), in place.

    Returns:
        The loss of each step (nats per token).
    """
    import torch
    from tqdm.auto import tqdm

    texts = [t + tokenizer.eos_token for t in texts]
    # Right padding, as TRL's preference collator pads: positions then count from the first real token.
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="Pretraining the tiny LM", disable=not progress, leave=False):
        idx = torch.randint(len(texts), (batch_size,), generator=gen)
        out = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses
