"""PyTorch MAFT model: open-vocabulary semantic segmentation with a mask-aware CLIP (IP-CLIP)."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange
from transformers.modeling_outputs import ModelOutput
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_maft import MaftClipVisionConfig


logger = logging.get_logger(__name__)


@dataclass
class MaftClipVisionModelOutput(ModelOutput):
    r"""
    Output of [`MaftClipVisionModel`].

    last_hidden_state (`torch.FloatTensor`):
        Without mask proposals: `(batch_size, 1 + num_patches, hidden_size)`, exactly as [`CLIPVisionModel`].
        With mask proposals: `(batch_size, num_proposals, hidden_size)`, the final proposal tokens (the class token
        became the proposal tokens, and the last layer does not update patch tokens: nothing reads them).
    pooler_output (`torch.FloatTensor`):
        The post-layernormed class token `(batch_size, hidden_size)`, as [`CLIPVisionModel`]; with mask proposals,
        the post-layernormed proposal tokens `(batch_size, num_proposals, hidden_size)`.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
        The projected class token, as [`CLIPVisionModelWithProjection`]; only without mask proposals.
    proposal_embeds (`torch.FloatTensor` of shape `(batch_size, num_proposals, projection_dim)`, *optional*):
        One embedding per mask proposal (not normalised), in CLIP's joint image-text space.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden states after the embeddings and after every layer, when `output_hidden_states=True` (no masks only).
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention weights of every layer, when `output_attentions=True` (no masks only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    proposal_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class MaftClipVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP's patch and position embeddings, with the position interpolation of the original MAFT as an option."""

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        num_patches = embeddings.shape[1] - 1
        position_embedding = self.position_embedding.weight.unsqueeze(0)
        num_positions = position_embedding.shape[1] - 1
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        pretrained_grid = int(num_positions**0.5)
        if num_patches == num_positions and grid_height == grid_width == pretrained_grid:
            return position_embedding

        dim = embeddings.shape[-1]
        patch_position_embedding = position_embedding[:, 1:].reshape(1, pretrained_grid, pretrained_grid, dim)
        patch_position_embedding = F.interpolate(
            patch_position_embedding.permute(0, 3, 1, 2),
            size=(grid_height, grid_width),
            mode="bicubic",
            align_corners=self.config.position_interpolation_align_corners,
        )
        patch_position_embedding = patch_position_embedding.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([position_embedding[:, :1], patch_position_embedding], dim=1)


def _split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)."""
    batch_size, num_tokens, hidden_size = states.shape
    return states.view(batch_size, num_tokens, num_heads, hidden_size // num_heads).transpose(1, 2)


def _merge_heads(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim)."""
    batch_size, num_heads, num_tokens, head_dim = states.shape
    return states.transpose(1, 2).reshape(batch_size, num_tokens, num_heads * head_dim)


def proposal_attention(
    proposal_queries: torch.Tensor,
    proposal_keys: torch.Tensor,
    proposal_values: torch.Tensor,
    patch_keys: torch.Tensor,
    patch_values: torch.Tensor,
    patch_keep: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """
    Attention of each proposal token to itself and to the patches inside its mask (IP-CLIP, DESIGN.md §3).

    Queries, keys and values are `(batch, heads, tokens, head_dim)`; `patch_keep` is `(batch, proposals, patches)`
    boolean. This costs `proposals * (patches + 1)` scores, where a dense mask over all tokens would cost
    `(proposals + patches) ** 2`. A proposal always sees itself, so no row is fully masked.
    """
    patch_scores = torch.matmul(proposal_queries, patch_keys.transpose(-1, -2)) * scale
    patch_scores = patch_scores.masked_fill(~patch_keep[:, None], float("-inf"))
    self_scores = (proposal_queries * proposal_keys).sum(dim=-1, keepdim=True) * scale
    softmax_dtype = torch.promote_types(proposal_queries.dtype, torch.float32)
    weights = torch.cat([self_scores, patch_scores], dim=-1).softmax(dim=-1, dtype=softmax_dtype)
    weights = F.dropout(weights.to(proposal_queries.dtype), p=dropout)
    return weights[..., :1] * proposal_values + torch.matmul(weights[..., 1:], patch_values)


class MaftClipVisionModel(CLIPVisionModel):
    """
    The IP-CLIP image encoder of MAFT: a CLIP vision tower that takes an image and any number of mask proposals and
    returns one CLIP embedding per proposal in a single forward pass.

    From layer `config.mask_start_layer` on, the class token is replicated once per proposal; a proposal token attends
    to itself and to the patches inside its mask, while patch tokens attend to all patches and to no proposal token.
    Without mask proposals it is exactly [`CLIPVisionModelWithProjection`]. Loads any CLIP checkpoint
    (`CLIPModel` or `CLIPVisionModelWithProjection`), e.g. `MaftClipVisionModel.from_pretrained("openai/clip-vit-base-patch16")`.
    """

    config_class = MaftClipVisionConfig
    config: MaftClipVisionConfig
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    def __init__(self, config: MaftClipVisionConfig):
        super().__init__(config)
        self.embeddings = MaftClipVisionEmbeddings(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.visual_projection.weight, std=self.config.hidden_size**-0.5 * self.config.initializer_factor)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_proposals: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MaftClipVisionModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            CLIP-normalised images.
        mask_proposals (`torch.Tensor` of shape `(batch_size, num_proposals, mask_height, mask_width)`, *optional*):
            Mask proposals as probabilities or booleans, at any resolution (they are resized to the patch grid).
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Interpolate the position embeddings to the input size (needed when it differs from `config.image_size`).
        """
        self._check_inputs(pixel_values, mask_proposals)
        if mask_proposals is None:
            vision_outputs = super().forward(
                pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
            return MaftClipVisionModelOutput(
                last_hidden_state=vision_outputs.last_hidden_state,
                pooler_output=vision_outputs.pooler_output,
                image_embeds=self.visual_projection(vision_outputs.pooler_output),
                hidden_states=vision_outputs.hidden_states,
                attentions=vision_outputs.attentions,
            )
        if output_hidden_states or output_attentions:
            raise ValueError(
                "`output_hidden_states` and `output_attentions` are only available without `mask_proposals`: the "
                "proposal layers do not build the dense attention those outputs would describe."
            )

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        layers = self.encoder.layers
        for layer in layers[: self.config.mask_start_layer]:
            hidden_states = layer(hidden_states, None)

        grid_size = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        patch_keep = self.mask_proposals_to_patch_mask(mask_proposals, grid_size)
        # The class token becomes the proposal tokens: from here on, patches see only patches.
        num_patches = hidden_states.shape[1] - 1
        tokens = torch.cat([hidden_states[:, 1:], hidden_states[:, :1].expand(-1, patch_keep.shape[1], -1)], dim=1)
        for layer_index in range(self.config.mask_start_layer, len(layers)):
            is_last_layer = layer_index == len(layers) - 1
            tokens = self._proposal_layer_forward(layers[layer_index], tokens, num_patches, patch_keep, is_last_layer)

        # The last layer returned the proposal tokens only.
        pooled_output = self.post_layernorm(tokens)
        return MaftClipVisionModelOutput(
            last_hidden_state=tokens,
            pooler_output=pooled_output,
            proposal_embeds=self.visual_projection(pooled_output),
        )

    def mask_proposals_to_patch_mask(self, mask_proposals: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Resizes proposals (B, Q, H, W) bilinearly to the patch grid and thresholds them: (B, Q, patches) bool."""
        batch_size, num_proposals = mask_proposals.shape[:2]
        if num_proposals == 0:
            return mask_proposals.new_zeros((batch_size, 0, grid_size[0] * grid_size[1]), dtype=torch.bool)
        masks = mask_proposals if mask_proposals.dtype == torch.float64 else mask_proposals.float()
        masks = F.interpolate(masks, size=grid_size, mode="bilinear", align_corners=False)
        return (masks >= self.config.mask_threshold).flatten(2)

    def _proposal_layer_forward(
        self, layer: CLIPEncoderLayer, tokens: torch.Tensor, num_patches: int, patch_keep: torch.Tensor, is_last_layer: bool
    ) -> torch.Tensor:
        """
        One CLIP encoder layer over `tokens` = [patches; proposals]: patches attend to all patches (unmasked, as CLIP),
        proposals to themselves and the patches of their mask, sharing one projection of all tokens. In the last layer
        only the proposals are updated and returned (nothing reads the patches after it).
        """
        attention = layer.self_attn
        dropout = attention.dropout if self.training else 0.0
        first_query = num_patches if is_last_layer else 0

        normed = layer.layer_norm1(tokens)
        queries = _split_heads(attention.q_proj(normed[:, first_query:]), attention.num_heads)
        keys = _split_heads(attention.k_proj(normed), attention.num_heads)
        values = _split_heads(attention.v_proj(normed), attention.num_heads)
        patch_keys, patch_values = keys[:, :, :num_patches], values[:, :, :num_patches]
        attention_output = proposal_attention(
            queries[:, :, num_patches - first_query :],
            keys[:, :, num_patches:],
            values[:, :, num_patches:],
            patch_keys,
            patch_values,
            patch_keep,
            attention.scale,
            dropout,
        )
        if not is_last_layer:
            patch_output = F.scaled_dot_product_attention(
                queries[:, :, :num_patches], patch_keys, patch_values, dropout_p=dropout, scale=attention.scale
            )
            attention_output = torch.cat([patch_output, attention_output], dim=2)

        tokens = tokens[:, first_query:] + attention.out_proj(_merge_heads(attention_output))
        return tokens + layer.mlp(layer.layer_norm2(tokens))

    def _check_inputs(self, pixel_values: torch.Tensor, mask_proposals: torch.Tensor | None) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        if mask_proposals is None:
            return
        if mask_proposals.dim() != 4:
            raise ValueError(
                "`mask_proposals` must have shape (batch_size, num_proposals, height, width), "
                f"got {tuple(mask_proposals.shape)}."
            )
        if mask_proposals.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"`mask_proposals` has batch size {mask_proposals.shape[0]} but `pixel_values` has "
                f"{pixel_values.shape[0]}: give one set of proposals per image."
            )
        if mask_proposals.dtype != torch.bool and not mask_proposals.is_floating_point():
            raise ValueError(
                f"`mask_proposals` must be boolean or floating point (probabilities), got {mask_proposals.dtype}."
            )
        if mask_proposals.shape[-2] == 0 or mask_proposals.shape[-1] == 0:
            raise ValueError(f"`mask_proposals` must have a non-empty spatial size, got {tuple(mask_proposals.shape)}.")
        if mask_proposals.is_floating_point() and not torch.isfinite(mask_proposals).all():
            raise ValueError("`mask_proposals` contains NaN or infinite values.")

    def apply_mask_aware_finetuning_recipe(self) -> list[str]:
        """
        Freezes everything but what MAFT fine-tunes (DESIGN.md §4): the attention projections (q, k, v, out) and both
        layer norms of every encoder layer, and the post layer norm. Returns the names of the trainable parameters.
        """
        trainable_parts = ("self_attn.", "layer_norm1.", "layer_norm2.")
        trainable = []
        for name, parameter in self.named_parameters():
            is_trainable = name.startswith("post_layernorm.") or (
                name.startswith("encoder.layers.") and any(part in name for part in trainable_parts)
            )
            parameter.requires_grad_(is_trainable)
            if is_trainable:
                trainable.append(name)
        return trainable


class ClassEmbeddingCache:
    """
    Template-ensembled class embeddings by class, so that a repeated vocabulary is not encoded again.

    A class is keyed by the token ids of its prompts (padding stripped, so the key does not depend on the other
    classes of the batch). Entries are dropped whenever the text encoder's parameters change: any in-place update (an
    optimizer step, `load_state_dict`) bumps a tensor's version counter, and moving the model replaces the tensors.
    """

    def __init__(self):
        self._embeddings: dict[bytes, torch.Tensor] = {}
        self._weights_state: tuple | None = None

    @staticmethod
    def class_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
        """Key of one class from its (templates, length) prompt tokens."""
        lengths = attention_mask.sum(dim=-1).tolist()
        rows = input_ids.cpu().numpy()
        return b"|".join(row[:length].tobytes() for row, length in zip(rows, lengths))

    def get(self, keys: list[bytes], encoder: nn.Module) -> list[torch.Tensor | None]:
        weights_state = tuple((parameter.data_ptr(), parameter._version) for parameter in encoder.parameters())
        if weights_state != self._weights_state:
            self._embeddings.clear()
            self._weights_state = weights_state
        return [self._embeddings.get(key) for key in keys]

    def put(self, keys: list[bytes], embeddings: torch.Tensor) -> None:
        self._embeddings.update(zip(keys, embeddings))

    def __len__(self) -> int:
        return len(self._embeddings)


def mask_aware_loss(
    class_probabilities: torch.Tensor, proposal_masks: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """
    MAFT's mask-aware loss (DESIGN.md §4): for every class present in an image, the soft IoU of each proposal with
    that class's ground-truth mask, min-max normalised over the proposals, is the SmoothL1 target of the proposal's
    probability for the class. Averaged over all (class, proposal) pairs of the batch; zero when no pixel is labelled.

    class_probabilities: (B, Q, C); proposal_masks: (B, Q, H, W) probabilities; labels: (B, H, W) class indices or
    `ignore_index` (ignored pixels belong to no ground-truth mask, but still count in a proposal's area).
    """
    predictions, targets = [], []
    for probabilities, masks, image_labels in zip(class_probabilities, proposal_masks, labels):
        present = image_labels.unique()
        present = present[present != ignore_index]
        if present.numel() == 0:
            continue
        if present.min() < 0 or present.max() >= probabilities.shape[-1]:
            raise ValueError(
                f"`labels` must hold class indices in [0, {probabilities.shape[-1] - 1}] or {ignore_index} (ignore), "
                f"got values {present.tolist()}."
            )
        ground_truth = (image_labels.flatten()[None] == present[:, None]).to(masks.dtype)  # (K, H*W)
        flat_masks = masks.detach().flatten(1)  # (Q, H*W)
        intersection = ground_truth @ flat_masks.T  # (K, Q)
        union = ground_truth.sum(-1, keepdim=True) + flat_masks.sum(-1) - intersection
        iou = intersection / (union + 1e-7)
        iou_min, iou_max = iou.min(dim=-1, keepdim=True).values, iou.max(dim=-1, keepdim=True).values
        targets.append((iou - iou_min) / (iou_max - iou_min + 1e-8))
        predictions.append(probabilities[:, present].T)
    if not predictions:
        return class_probabilities.sum() * 0.0
    return F.smooth_l1_loss(torch.cat(predictions), torch.cat(targets))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MAFT's self-distillation: SmoothL1 between the class distributions of the student and the frozen teacher."""
    return F.smooth_l1_loss(student_logits.softmax(dim=-1), teacher_logits.detach().softmax(dim=-1))


register_checkpoint_conversion_mapping("MaftClipVisionModel", [PrefixChange(prefix_to_remove="vision_model")])


__all__ = ["MaftClipVisionModel", "MaftClipVisionModelOutput", "distillation_loss", "mask_aware_loss", "proposal_attention"]
