"""LoRA adapters made offline for the toy checkpoints: tests load them through the same code as real ones.

:func:`random_lora` adds a PEFT adapter with random (non-zero) weights to a checkpoint's transformer
and returns it as diffusers writes LoRA files (``transformer.…lora_A.weight`` keys, safetensors), so
it changes the toy's output the way a trained adapter changes a real model's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(checkpoint: str | Path, *, rank: int = 4, seed: int = 0, targets: tuple[str, ...] = TARGETS) -> bytes:
    """The bytes of a ``.safetensors`` LoRA for the diffusers checkpoint directory ``checkpoint``."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    checkpoint = Path(checkpoint)
    pipeline_class = getattr(diffusers, json.loads((checkpoint / "model_index.json").read_text())["_class_name"])
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    transformer = getattr(diffusers, config["_class_name"]).from_pretrained(checkpoint / "transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets)))
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_class.save_lora_weights(tmp, transformer_lora_layers=state, weight_name="lora.safetensors")
        return (Path(tmp) / "lora.safetensors").read_bytes()
