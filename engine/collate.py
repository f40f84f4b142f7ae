"""Prepared requests as one batch of model inputs: left-padded, as transformers' `generate()` takes them.

Both engines collate the same way: the generate() engine runs the batch as it is, the continuous
engine's prefill re-lays it out right-padded on the device (Glm4vDecoder.prefill).
"""

from __future__ import annotations

import torch

from engine.prompts import PreparedRequest


def collate(batch: list[PreparedRequest], pad_token_id: int, pixel_dtype: torch.dtype,
            pixels: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded inputs for `batch`, on the CPU: input_ids and attention_mask [rows, width], the
    multimodal token types where any request has them, and every image's patch grid and (unless not
    `pixels`: a prefill whose images all lie in cached blocks) its pixels in `pixel_dtype`, in request order."""
    width = max(r.prompt_tokens for r in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    mm_types = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = r.prompt_tokens
        input_ids[i, width - n:] = torch.tensor(r.input_ids)
        attention_mask[i, width - n:] = 1
        if r.mm_token_type_ids is not None:
            mm_types[i, width - n:] = torch.tensor(r.mm_token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if any(r.mm_token_type_ids is not None for r in batch):
        inputs["mm_token_type_ids"] = mm_types
    grids = [g for r in batch if r.pixel_values is not None for g in r.image_grid_thw]
    if grids:
        inputs["image_grid_thw"] = torch.tensor(grids)
        if pixels:
            images = [r.pixel_values for r in batch if r.pixel_values is not None]
            inputs["pixel_values"] = torch.cat(images).to(pixel_dtype)
    return inputs
