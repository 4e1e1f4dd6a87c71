"""Contrastive pre-training of a small `CLIPModel` on image-caption pairs: the miniature world's stand-in for the
web-scale pre-training that gives real CLIP its image-level knowledge of every concept."""

import math

import datasets
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ..processing_maft import MaftImageProcessor


def small_clip_config(vocab_size: int, image_size: int = 96, patch_size: int = 8, width: int = 64,
                      projection_dim: int = 64, max_text_length: int = 32) -> CLIPConfig:
    """A CLIP with 4 image layers and 3 text layers, `width` wide (about 0.2 M parameters per tower at width 64)."""
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=max_text_length, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=projection_dim,
    )


def pretrain_clip(pairs: datasets.Dataset, tokenizer: CLIPTokenizer, image_processor: MaftImageProcessor, config: CLIPConfig,
                  steps: int = 1500, batch_size: int = 128, learning_rate: float = 1e-3, weight_decay: float = 0.1,
                  warmup_steps: int = 100, group_size: int = 1, seed: int = 0) -> CLIPModel:
    """Trains `CLIPModel(config)` with CLIP's symmetric contrastive loss on the `image` and `caption` columns of
    `pairs`, images prepared as IP-CLIP will see them; AdamW with linear warm-up and cosine decay. Batches are made of
    whole groups of `group_size` consecutive pairs (e.g. 2 for a scene and its hard-negative twin)."""
    if len(pairs) < batch_size:
        raise ValueError(f"CLIP pre-training needs at least one batch of pairs ({batch_size}), got {len(pairs)}.")
    if batch_size % group_size or len(pairs) % group_size:
        raise ValueError(f"`batch_size` ({batch_size}) and the number of pairs ({len(pairs)}) must be multiples of `group_size` ({group_size}).")
    set_seed(seed)
    model = CLIPModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(seed)

    def shuffled() -> list[int]:
        groups = torch.randperm(len(pairs) // group_size, generator=generator)
        return (groups[:, None] * group_size + torch.arange(group_size)).flatten().tolist()

    progress = tqdm(range(steps), desc="pre-training CLIP", unit="step")
    order, position = shuffled(), 0
    for _ in progress:
        if position + batch_size > len(order):
            order, position = shuffled(), 0
        batch = pairs[order[position : position + batch_size]]
        position += batch_size
        pixel_values = image_processor(batch["image"], do_resize=False)["clip_pixel_values"]
        text = tokenizer(batch["caption"], padding=True, truncation=True, return_tensors="pt")
        loss = model(**text, pixel_values=pixel_values, return_loss=True).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
