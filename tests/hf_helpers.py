"""What several test modules do with transformers: load a saved Hugging Face model back and run it."""

import warnings

import torch
import transformers


def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """The logits transformers computes for ``ids`` with the model saved at ``path`` (eager attention)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits
