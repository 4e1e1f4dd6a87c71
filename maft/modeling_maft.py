"""PyTorch MAFT model: open-vocabulary semantic segmentation with a mask-aware CLIP (IP-CLIP)."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, CLIPConfig, CLIPTextModelWithProjection, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import load_backbone
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings, eager_attention_forward
from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding
from transformers.utils import is_torchdynamo_compiling, logging
from transformers.utils.generic import can_return_tuple

from .configuration_maft import MaftClipVisionConfig, MaftConfig, MaftDeepLabResNetConfig
from .deformable_attention import MultiScaleDeformableAttention


logger = logging.get_logger(__name__)


def check_finite_images(name: str, images: torch.Tensor) -> None:
    """Refuses images (B, C, H, W) holding NaN or infinite values, naming the argument and the images. A value check
    waits for the data: done in eager mode only, so that a compiled model has no graph break."""
    if is_torchdynamo_compiling() or torch.isfinite(images).all():
        return
    bad = sorted({int(index) for index in (~torch.isfinite(images)).flatten(1).any(1).nonzero()})
    raise ValueError(f"`{name}` of image(s) {bad} holds NaN or infinite values: check the input images.")


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Refuses a weights file that is not a complete safetensors file (e.g. cut off by an interrupted copy), naming it."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is incomplete or corrupt (truncated, or not a safetensors file): {error}") from error


class MaftWeightsFileErrorsMixin:
    """`from_pretrained` naming a damaged weights file: safetensors' own error says only that a header is wrong."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
                check_safetensors_file(path)
            raise ValueError(
                f"a weights file of {pretrained_model_name_or_path} is incomplete or corrupt (truncated, or not a "
                f"safetensors file): {error}"
            ) from error


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


def proposal_attention_mask(patch_keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """
    The additive attention mask of IP-CLIP's proposal tokens over the keys [patches; proposals]: a proposal attends to
    the patches its mask keeps and to itself, nothing else (DESIGN.md §3). `patch_keep` (B, Q, L) boolean ->
    (B, 1, Q, L + Q). A proposal always sees itself, so no row is fully masked.
    """
    batch_size, num_proposals, _ = patch_keep.shape
    itself = torch.eye(num_proposals, dtype=torch.bool, device=patch_keep.device).expand(batch_size, -1, -1)
    allowed = torch.cat([patch_keep, itself], dim=-1)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class MaftClipEncoderLayer(CLIPEncoderLayer):
    """
    CLIP's encoder layer (same weights), which also runs as a proposal layer of IP-CLIP when given the proposals'
    attention mask: over `hidden_states` = [patches; proposals], patches attend to all patches (unmasked, as CLIP) and
    proposals to themselves and the patches of their mask, sharing one projection of all tokens. Both attentions go
    through transformers' attention interface (`config._attn_implementation`), and the layer is checkpointed as CLIP's
    under gradient checkpointing. In the last layer only the proposals are updated and returned: nothing reads the
    patches after it.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        proposal_attention_mask: torch.Tensor | None = None,
        is_last_layer: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        if proposal_attention_mask is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        attention = self.self_attn
        num_proposals = proposal_attention_mask.shape[2]
        num_patches = hidden_states.shape[1] - num_proposals
        first_query = num_patches if is_last_layer else 0
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
        dropout = attention.dropout if self.training else 0.0

        normed = self.layer_norm1(hidden_states)
        queries = _split_heads(attention.q_proj(normed[:, first_query:]), attention.num_heads)
        keys = _split_heads(attention.k_proj(normed), attention.num_heads)
        values = _split_heads(attention.v_proj(normed), attention.num_heads)
        proposal_queries = queries[:, :, num_patches - first_query :]
        if num_proposals:
            proposal_output, _ = attend(attention, proposal_queries, keys, values, proposal_attention_mask,
                                        scaling=attention.scale, dropout=dropout)
        else:  # attention implementations reject empty queries
            proposal_output = proposal_queries.transpose(1, 2)
        attention_output = proposal_output
        if not is_last_layer:
            patch_keys, patch_values = keys[:, :, :num_patches], values[:, :, :num_patches]
            patch_output, _ = attend(attention, queries[:, :, :num_patches], patch_keys, patch_values, None,
                                     scaling=attention.scale, dropout=dropout)
            attention_output = torch.cat([patch_output, proposal_output], dim=1)
        hidden_states = hidden_states[:, first_query:] + attention.out_proj(attention_output.flatten(2))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class MaftClipVisionModel(MaftWeightsFileErrorsMixin, CLIPVisionModel):
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
    _supports_flash_attn = False  # the proposal layers need an arbitrary attention mask
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    def __init__(self, config: MaftClipVisionConfig):
        super().__init__(config)
        self.embeddings = MaftClipVisionEmbeddings(config)
        self.encoder.layers = nn.ModuleList(MaftClipEncoderLayer(config) for _ in range(config.num_hidden_layers))
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
        attention_mask = proposal_attention_mask(patch_keep, hidden_states.dtype)
        # The class token becomes the proposal tokens: from here on, patches see only patches.
        tokens = torch.cat([hidden_states[:, 1:], hidden_states[:, :1].expand(-1, patch_keep.shape[1], -1)], dim=1)
        for layer_index in range(self.config.mask_start_layer, len(layers)):
            tokens = layers[layer_index](tokens, None, attention_mask, layer_index == len(layers) - 1)

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

    def _check_inputs(self, pixel_values: torch.Tensor, mask_proposals: torch.Tensor | None) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        check_finite_images("pixel_values", pixel_values)
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
        # a value check waits for the data: done in eager mode only, so that a compiled model has no graph break
        if not is_torchdynamo_compiling() and mask_proposals.is_floating_point() and not torch.isfinite(mask_proposals).all():
            raise ValueError("`mask_proposals` contains NaN or infinite values.")


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers), as the DeepLab backbone uses."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map (scale, shift) the normalisation applies."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return hidden_states * scale[None, :, None, None] + shift[None, :, None, None]


class Conv2dWithNorm(nn.Conv2d):
    """A convolution followed by a normalisation layer stored as its `norm` attribute (detectron2's layout)."""

    def __init__(self, *args, norm: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, FrozenBatchNorm2d):
            # Frozen statistics fold into the convolution's weights: no extra pass over its output.
            scale, shift = self.norm.scale_and_shift()
            bias = shift if self.bias is None else shift + self.bias * scale
            return self._conv_forward(hidden_states, self.weight * scale[:, None, None, None], bias)
        return self.norm(super().forward(hidden_states))


class MaftDeepLabBottleneck(nn.Module):
    """ResNet bottleneck block with frozen batch norm and an optional dilation of its 3x3 convolution."""

    def __init__(self, config: MaftDeepLabResNetConfig, in_channels: int, bottleneck_channels: int, out_channels: int,
                 stride: int, dilation: int):
        super().__init__()

        def conv(in_size: int, out_size: int, kernel: int, **kwargs) -> Conv2dWithNorm:
            norm = FrozenBatchNorm2d(out_size, config.batch_norm_eps)
            return Conv2dWithNorm(in_size, out_size, kernel, bias=False, norm=norm, **kwargs)

        self.shortcut = conv(in_channels, out_channels, 1, stride=stride) if in_channels != out_channels else None
        stride_1x1, stride_3x3 = (stride, 1) if config.stride_in_1x1 else (1, stride)
        self.conv1 = conv(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = conv(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=dilation,
                          dilation=dilation, groups=config.num_groups)
        self.conv3 = conv(bottleneck_channels, out_channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shortcut = hidden_states if self.shortcut is None else self.shortcut(hidden_states)
        hidden_states = F.relu(self.conv1(hidden_states), inplace=True)
        hidden_states = F.relu(self.conv2(hidden_states), inplace=True)
        return F.relu(self.conv3(hidden_states).add_(shortcut), inplace=True)


class MaftDeepLabStem(nn.Module):
    """Three 3x3 convolutions (the first with stride 2) and a 3x3 max pool with stride 2."""

    def __init__(self, config: MaftDeepLabResNetConfig):
        super().__init__()
        half = config.stem_out_channels // 2
        sizes = [(3, half, 2), (half, half, 1), (half, config.stem_out_channels, 1)]
        for index, (in_size, out_size, stride) in enumerate(sizes, start=1):
            norm = FrozenBatchNorm2d(out_size, config.batch_norm_eps)
            self.add_module(f"conv{index}", Conv2dWithNorm(in_size, out_size, 3, stride=stride, padding=1, bias=False, norm=norm))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = F.relu(self.conv1(pixel_values), inplace=True)
        hidden_states = F.relu(self.conv2(hidden_states), inplace=True)
        hidden_states = F.relu(self.conv3(hidden_states), inplace=True)
        return F.max_pool2d(hidden_states, kernel_size=3, stride=2, padding=1)


class MaftDeepLabResNet(nn.Module):
    """DeepLab-style ResNet (detectron2's `build_resnet_deeplab_backbone`): features res2..res5 at strides 4..32."""

    def __init__(self, config: MaftDeepLabResNetConfig):
        super().__init__()
        self.stem = MaftDeepLabStem(config)
        in_channels, out_channels = config.stem_out_channels, config.res2_out_channels
        bottleneck_channels = config.num_groups * config.width_per_group
        self.channels = []
        for stage_index, num_blocks in enumerate(config.depths):
            dilation = {2: config.res4_dilation, 3: config.res5_dilation}.get(stage_index, 1)
            first_stride = 1 if stage_index == 0 or dilation > 1 else 2
            if stage_index == 3:
                dilations = [dilation * multiplier for multiplier in config.res5_multi_grid]
            else:
                dilations = [dilation] * num_blocks
            blocks = []
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                blocks.append(
                    MaftDeepLabBottleneck(config, in_channels, bottleneck_channels, out_channels, stride, dilations[block_index])
                )
                in_channels = out_channels
            self.add_module(f"res{stage_index + 2}", nn.Sequential(*blocks))
            self.channels.append(out_channels)
            out_channels, bottleneck_channels = out_channels * 2, bottleneck_channels * 2

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps in channels-last memory format, in which the CPU's convolutions run fastest."""
        hidden_states = self.stem(pixel_values.contiguous(memory_format=torch.channels_last))
        features = []
        for stage in (self.res2, self.res3, self.res4, self.res5):
            hidden_states = stage(hidden_states)
            features.append(hidden_states)
        return features


class MaftAutoBackbone(nn.Module):
    """Any transformers backbone (`AutoBackbone`) that gives four feature maps at strides 4, 8, 16 and 32."""

    def __init__(self, config: MaftConfig):
        super().__init__()
        self.model = load_backbone(config)
        self.channels = list(self.model.channels)
        if len(self.channels) != 4:
            raise ValueError(
                f"The backbone must output four feature maps (strides 4, 8, 16, 32), but its `out_features` give "
                f"{len(self.channels)}: set `out_features` (or `out_indices`) of `backbone_config` to four stages."
            )

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(pixel_values).feature_maps)


def sine_position_embedding(feature_map: torch.Tensor) -> torch.Tensor:
    """DETR's normalised sine position embedding of a (B, C, H, W) map, with C channels, in float32."""
    return Mask2FormerSinePositionEmbedding.build_sine_position_embedding(
        feature_map.shape, feature_map.device, torch.float32, feature_map.shape[1] // 2, normalize=True, scale=2 * math.pi
    )


class MaftPixelDecoderLayer(GradientCheckpointingLayer):
    """Deformable self-attention over the multi-scale features, then a feed-forward network (post-norm)."""

    def __init__(self, config: MaftConfig):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            config.feature_size, config.encoder_attention_heads, config.num_feature_levels, config.encoder_num_points,
            backend=config.deformable_attention_backend,
        )
        self.norm1 = nn.LayerNorm(config.feature_size)
        self.linear1 = nn.Linear(config.feature_size, config.encoder_feedforward_dim)
        self.linear2 = nn.Linear(config.encoder_feedforward_dim, config.feature_size)
        self.norm2 = nn.LayerNorm(config.feature_size)
        self.dropout = nn.Dropout(config.encoder_dropout)

    def forward(self, hidden_states, position_embeddings, reference_points, spatial_shapes: list[tuple[int, int]]):
        attended = self.self_attn(hidden_states + position_embeddings, reference_points, hidden_states, spatial_shapes)
        hidden_states = self.norm1(hidden_states + self.dropout(attended))
        feed_forward = self.linear2(self.dropout(F.relu(self.linear1(hidden_states))))
        return self.norm2(hidden_states + self.dropout(feed_forward))


class MaftPixelDecoder(nn.Module):
    """
    Mask2Former's multi-scale deformable-attention pixel decoder: res3..res5 projected to `feature_size`, refined by
    deformable attention layers; an FPN step adds res2; `mask_features` at stride 4. Runs in float32.
    """

    def __init__(self, config: MaftConfig, backbone_channels: list[int]):
        super().__init__()
        size = config.feature_size
        # Lowest resolution first, as the decoder consumes them: res5, res4, res3.
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, size, kernel_size=1), nn.GroupNorm(32, size))
            for channels in backbone_channels[:0:-1]
        )
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, size))
        self.layers = nn.ModuleList(MaftPixelDecoderLayer(config) for _ in range(config.encoder_layers))
        self.lateral_conv = Conv2dWithNorm(backbone_channels[0], size, kernel_size=1, bias=False, norm=nn.GroupNorm(32, size))
        self.output_conv = Conv2dWithNorm(size, size, kernel_size=3, padding=1, bias=False, norm=nn.GroupNorm(32, size))
        self.mask_features = nn.Conv2d(size, config.mask_feature_size, kernel_size=1)

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalised to [0, 1]: (1, S, levels, 2) as (x, y)."""
        points = []
        for height, width in spatial_shapes:
            y, x = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, device=device) / height,
                torch.linspace(0.5, width - 0.5, width, device=device) / width,
                indexing="ij",
            )
            points.append(torch.stack([x.flatten(), y.flatten()], dim=-1))
        return torch.cat(points)[None, :, None].expand(-1, -1, len(spatial_shapes), -1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features res2..res5 -> (mask_features, [res5-, res4-, res3-level maps]), in the features' dtype. The decoder
        runs in its weights' dtype without autocast, as the original (float32 under mixed precision, and when loaded
        with `dtype=torch.float16`: `_keep_in_fp32_modules`)."""
        input_dtype, dtype = features[0].dtype, self.mask_features.weight.dtype
        with torch.autocast(features[0].device.type, enabled=False):
            mask_features, multi_scale_features = self._decode([feature.to(dtype) for feature in features])
        return mask_features.to(input_dtype), [feature.to(input_dtype) for feature in multi_scale_features]

    def _decode(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        projected = [projection(feature) for projection, feature in zip(self.input_projections, features[:0:-1])]
        spatial_shapes = [tuple(feature.shape[-2:]) for feature in projected]
        hidden_states = torch.cat([feature.flatten(2).transpose(1, 2) for feature in projected], dim=1)
        position_embeddings = torch.cat(
            [
                sine_position_embedding(feature).to(feature.dtype).flatten(2).transpose(1, 2) + self.level_embed[level]
                for level, feature in enumerate(projected)
            ],
            dim=1,
        )
        reference_points = self.reference_points(spatial_shapes, hidden_states.device)  # float32: see the attention
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, reference_points, spatial_shapes)  # Python ints: no host sync

        batch_size = hidden_states.shape[0]
        multi_scale_features = [
            level_states.transpose(1, 2).reshape(batch_size, -1, height, width)
            for level_states, (height, width) in zip(hidden_states.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
        ]
        finest = self.lateral_conv(features[0])
        finest = finest + F.interpolate(multi_scale_features[-1], size=finest.shape[-2:], mode="bilinear", align_corners=False)
        finest = F.relu(self.output_conv(finest))
        return self.mask_features(finest), multi_scale_features


class MaftContextInteraction(nn.Module):
    """
    FreeSeg's text-to-pixel context interaction: the pixels of each feature map (layer-normed) cross-attend to the
    layer-normed class text embeddings, and the layer-scaled result is added to the normed pixels. One block serves all
    maps. As in the original (GLIP's block), the text is layer-normed again before each map, so map i sees it normed
    i + 1 times; the released weights were trained with this, so we keep it.

    The attention is computed in an equivalent order that suits few keys and many pixels: the query projection is
    folded into the keys (`q_h . k = pixel . (W_q,h^T k) + b_q,h . k`) and the output projection into the values,
    so the pixels meet the (classes x heads) keys and values in two products of their own width (256) instead of
    being projected to the attention width (2048) and back: 2.7x fewer operations at 640 pixels and 150 classes.
    """

    def __init__(self, config: MaftConfig):
        super().__init__()
        self.num_heads = config.context_attention_heads
        self.query_norm = nn.LayerNorm(config.feature_size)
        self.text_norm = nn.LayerNorm(config.projection_dim)
        self.q_proj = nn.Linear(config.feature_size, config.context_attention_dim)
        self.k_proj = nn.Linear(config.projection_dim, config.context_attention_dim)
        self.v_proj = nn.Linear(config.projection_dim, config.context_attention_dim)
        self.out_proj = nn.Linear(config.context_attention_dim, config.feature_size)
        self.layer_scale = nn.Parameter(torch.full((config.feature_size,), config.context_layer_scale_init))
        self.dropout = config.context_dropout

    def forward(self, feature_maps: list[torch.Tensor], text_embeds: torch.Tensor) -> list[torch.Tensor]:
        """feature_maps: (B, C, H, W) each; text_embeds (B, K, D) -> the maps with text context added."""
        outputs = []
        text = text_embeds
        for feature_map in feature_maps:
            batch_size, channels, height, width = feature_map.shape
            text = self.text_norm(text)
            pixels = self.query_norm(feature_map.flatten(2).transpose(1, 2))
            key_weights, key_bias, value_weights = self._text_as_keys_and_values(text)
            scores = torch.baddbmm(key_bias[:, None], pixels, key_weights)  # (B, HW, heads * K)
            attention = scores.view(batch_size, -1, self.num_heads, text.shape[1]).softmax(dim=-1)
            attention = F.dropout(attention, p=self.dropout, training=self.training).flatten(2)
            attended = torch.baddbmm(self.out_proj.bias, attention, value_weights)
            pixels = pixels + self.layer_scale * attended
            outputs.append(pixels.transpose(1, 2).reshape(batch_size, channels, height, width))
        return outputs

    def _text_as_keys_and_values(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The text (B, K, D) as keys in the pixels' space, with the query projection and the attention's scale folded
        in: weights (B, C, heads * K) and bias (B, heads * K); and as values with the output projection folded in
        (B, heads * K, C), without its bias (added once to the sum over heads).
        """
        head_dim = self.q_proj.out_features // self.num_heads
        keys = _split_heads(self.k_proj(text), self.num_heads) * head_dim**-0.5  # (B, heads, K, head_dim)
        values = _split_heads(self.v_proj(text), self.num_heads)
        query_weight = self.q_proj.weight.view(self.num_heads, head_dim, -1)  # (heads, head_dim, C)
        key_weights = torch.einsum("hdc,bhkd->bchk", query_weight, keys).flatten(2)
        key_bias = torch.einsum("hd,bhkd->bhk", self.q_proj.bias.view(self.num_heads, head_dim), keys).flatten(1)
        output_weight = self.out_proj.weight.view(-1, self.num_heads, head_dim)  # (C, heads, head_dim)
        value_weights = torch.einsum("bhkd,chd->bhkc", values, output_weight).flatten(1, 2)
        return key_weights, key_bias, value_weights


class MaftMLP(nn.Module):
    """Linear layers with ReLU between them (`layers.{i}`, as the original)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_size, out_size) for in_size, out_size in zip(sizes[:-1], sizes[1:]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if index < len(self.layers) - 1:
                hidden_states = F.relu(hidden_states)
        return hidden_states


class MaftDecoderLayer(GradientCheckpointingLayer):
    """Masked cross-attention to one feature level, self-attention among queries, feed-forward (each post-norm)."""

    def __init__(self, config: MaftConfig):
        super().__init__()
        size, heads = config.hidden_dim, config.decoder_attention_heads
        self.cross_attn = nn.MultiheadAttention(size, heads)
        self.cross_attn_norm = nn.LayerNorm(size)
        self.self_attn = nn.MultiheadAttention(size, heads)
        self.self_attn_norm = nn.LayerNorm(size)
        self.linear1 = nn.Linear(size, config.decoder_feedforward_dim)
        self.linear2 = nn.Linear(config.decoder_feedforward_dim, size)
        self.ffn_norm = nn.LayerNorm(size)

    def forward(self, queries, query_positions, memory, memory_positions, attention_mask):
        """Sequence-first tensors: queries (Q, B, C), memory (HW, B, C); attention_mask (B*heads, Q, HW), True = blocked."""
        attended = self.cross_attn(queries + query_positions, memory + memory_positions, memory, attn_mask=attention_mask)[0]
        queries = self.cross_attn_norm(queries + attended)
        attended = self.self_attn(queries + query_positions, queries + query_positions, queries)[0]
        queries = self.self_attn_norm(queries + attended)
        return self.ffn_norm(queries + self.linear2(F.relu(self.linear1(queries))))


class MaftMaskedAttentionDecoder(nn.Module):
    """
    Mask2Former's masked-attention transformer decoder with MAFT's heads: each query predicts a class-agnostic mask
    (dot product with the mask features) and a CLIP-space class embedding. Cross-attention cycles through the three
    feature levels; a query only sees the pixels its previous mask prediction covers (>= 0.5).
    """

    def __init__(self, config: MaftConfig):
        super().__init__()
        self.num_heads = config.decoder_attention_heads
        self.num_levels = config.num_feature_levels
        self.query_features = nn.Embedding(config.num_queries, config.hidden_dim)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.hidden_dim)
        self.level_embed = nn.Embedding(config.num_feature_levels, config.hidden_dim)
        self.layers = nn.ModuleList(MaftDecoderLayer(config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(config.hidden_dim)
        self.class_embed = MaftMLP([config.hidden_dim, config.class_embed_hidden_dim, config.projection_dim])
        self.mask_embed = MaftMLP([config.hidden_dim] * 3 + [config.mask_feature_size])

    def predict(self, queries, mask_features, attention_size):
        """Class embeddings (B, Q, D), mask logits (B, Q, h, w) and the next layer's attention mask."""
        decoded = self.decoder_norm(queries).transpose(0, 1)
        class_embeds = self.class_embed(decoded)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        blocked = F.interpolate(mask_logits, size=attention_size, mode="bilinear", align_corners=False).sigmoid() < 0.5
        blocked = blocked.flatten(2).repeat_interleave(self.num_heads, dim=0)
        # A query that would see nothing sees everything instead.
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return class_embeds, mask_logits, blocked.detach()

    def forward(self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor):
        """Returns the class embeddings and mask logits of the initial prediction and after every layer."""
        batch_size = mask_features.shape[0]
        memories, memory_positions, sizes = [], [], []
        for level, feature in enumerate(multi_scale_features):
            sizes.append(feature.shape[-2:])
            memory_positions.append(sine_position_embedding(feature).to(feature.dtype).flatten(2).permute(2, 0, 1))
            memories.append((feature.flatten(2) + self.level_embed.weight[level][None, :, None]).permute(2, 0, 1))
        query_positions = self.query_position_embeddings.weight[:, None].expand(-1, batch_size, -1)
        queries = self.query_features.weight[:, None].expand(-1, batch_size, -1)

        class_embeds, mask_logits, blocked = self.predict(queries, mask_features, sizes[0])
        predictions = [(class_embeds, mask_logits)]
        for index, layer in enumerate(self.layers):
            level = index % self.num_levels
            queries = layer(queries, query_positions, memories[level], memory_positions[level], blocked)
            class_embeds, mask_logits, blocked = self.predict(queries, mask_features, sizes[(index + 1) % self.num_levels])
            predictions.append((class_embeds, mask_logits))
        return predictions


def proposal_masks_from_logits(masks_queries_logits: torch.Tensor, padded_size: tuple[int, int]) -> torch.Tensor:
    """The proposals IP-CLIP classifies, as the original makes them: mask logits (B, Q, h, w) upsampled to the padded
    input size (bilinear, `align_corners=True`) and sigmoided, without gradient: (B, Q, H, W) probabilities."""
    return F.interpolate(masks_queries_logits.detach(), size=padded_size, mode="bilinear", align_corners=True).sigmoid()


def proposal_masks_on_patch_grid(
    masks_queries_logits: torch.Tensor,
    padded_size: tuple[int, int],
    grid_size: tuple[int, int],
    clip_view_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    The proposals as IP-CLIP sees them, on its patch grid: (B, Q, grid_height, grid_width) probabilities equal to
    `F.interpolate(masks, size=grid_size, mode="bilinear")` of the masks of `proposal_masks_from_logits` (at the padded
    size) cropped to the top-left `clip_view_sizes[i]` region each CLIP view shows and resized back to the padded size
    (bilinear; no crop without `clip_view_sizes`). Every step is a bilinear resize, so each grid value is a weighted
    sum of 16 sigmoided logits at padded-size pixels, and only those pixels are computed (in float32, or float64 for
    float64 logits), not the (B, Q, H, W) masks; without gradient and without a host sync.
    """
    logits = masks_queries_logits.detach()
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    batch_size, num_queries, low_height, low_width = logits.shape
    if clip_view_sizes is None:
        regions = torch.tensor(padded_size, device=logits.device, dtype=dtype).expand(batch_size, 2)
    else:
        regions = clip_view_sizes.to(device=logits.device, dtype=dtype)
    row_matrix, row_weights = _patch_grid_taps(grid_size[0], padded_size[0], low_height, regions[:, 0])
    column_matrix, column_weights = _patch_grid_taps(grid_size[1], padded_size[1], low_width, regions[:, 1])
    pixels = (row_matrix[:, None] @ logits.to(dtype) @ column_matrix[:, None].transpose(-1, -2)).sigmoid()
    pixels = pixels.view(batch_size, num_queries, grid_size[0], 4, grid_size[1], 4)
    return torch.einsum("bqiajc,bia,bjc->bqij", pixels, row_weights, column_weights)


def _bilinear_taps(positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source indices and the second one's weight of bilinear sampling at `positions` (>= 0) of an axis of
    `length` pixels, as PyTorch's resize computes them."""
    first = positions.floor().clamp(max=length - 1)
    second = first + (first < length - 1).to(first.dtype)
    return first.long(), second.long(), (positions - first).clamp(0, 1)


def _patch_grid_taps(grid: int, padded: int, low: int, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One axis of `proposal_masks_on_patch_grid`: the 4 padded-size pixels behind each grid position and their weights
    (B, grid, 4); and those pixels as rows of the mask logits' upsampling (align_corners=True), (B, 4 * grid, low).
    """
    dtype, device = regions.dtype, regions.device
    # The padded size to the patch grid (align_corners=False; PyTorch clamps negative positions to 0).
    positions = ((torch.arange(grid, device=device, dtype=dtype) + 0.5) * (padded / grid) - 0.5).clamp(min=0)
    first, second, second_weight = _bilinear_taps(positions, padded)
    view_pixels = torch.stack([first, second], dim=-1).to(dtype)  # (grid, 2)
    view_weights = torch.stack([1 - second_weight, second_weight], dim=-1)
    # Each CLIP view's region resized to the padded size (an identity where the region is the whole input).
    positions = (view_pixels + 0.5) * (regions[:, None, None] / padded) - 0.5
    positions = torch.minimum(positions.clamp(min=0), regions[:, None, None] - 1)  # (B, grid, 2)
    first, second, second_weight = _bilinear_taps(positions, padded)
    pixels = torch.stack([first, second], dim=-1).flatten(2)  # (B, grid, 4)
    weights = (view_weights[..., None] * torch.stack([1 - second_weight, second_weight], dim=-1)).flatten(2)
    # The mask logits upsampled to the padded size (align_corners=True), at those pixels only.
    scale = (low - 1) / (padded - 1) if padded > 1 else 0.0
    first, second, second_weight = _bilinear_taps(pixels.flatten(1).to(dtype) * scale, low)
    matrix = torch.zeros(regions.shape[0], pixels[0].numel(), low, device=device, dtype=dtype)
    matrix.scatter_add_(-1, first[..., None], (1 - second_weight)[..., None])
    matrix.scatter_add_(-1, second[..., None], second_weight[..., None])
    return matrix, weights


@dataclass
class MaftModelOutput(ModelOutput):
    r"""
    Output of [`MaftModel`].

    class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_classes + 1)`):
        The final classification of each mask proposal: `softmax(class_queries_logits)[..., :-1]` are the class scores
        the semantic segmentation is made from (`MaftImageProcessor.post_process_semantic_segmentation`). With
        `ensemble_weight == 0` these are IP-CLIP's scores; otherwise the geometric ensemble with the proposal
        generator's in-vocabulary scores.
    masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height / 4, width / 4)`):
        Class-agnostic mask logits of the proposals, at a quarter of the padded input size.
    proposal_class_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_classes + 1)`):
        The proposal generator's in-vocabulary logits `logit_scale * cos(e_q, [T; no-object])`.
    clip_class_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_classes + 1)`):
        IP-CLIP's logits `logit_scale * cos(f_q, [T; no-object])`.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, num_classes, projection_dim)`):
        The L2-normalised, template-ensembled class text embeddings T.
    proposal_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, projection_dim)`):
        The L2-normalised IP-CLIP embedding of each proposal.
    image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
        The unpadded (height, width) of each image in the padded input, passed through for post-processing.
    padded_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
        Set when an inference batch was segmented image by image at each one's own padded size (`clip_view_sizes`):
        the masks of image `i` are the top-left `padded_sizes[i] / 4` of `masks_queries_logits`, the rest edge padding.
        `None` when the masks of every image refer to the whole padded input.
    auxiliary_logits (`list[dict[str, torch.FloatTensor]]`, *optional*):
        `class_queries_logits` (in-vocabulary) and `masks_queries_logits` of the proposal generator's earlier
        predictions, earliest first: the initial one (before the first decoder layer) and those after every decoder
        layer but the last. The training losses (`maft.loss_maft`) read them.

    The training losses are not part of the output: the training code owns them (`maft.training.recipes`), as
    transformers' Mask2Former does.
    """

    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    proposal_class_logits: torch.FloatTensor | None = None
    clip_class_logits: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    proposal_embeds: torch.FloatTensor | None = None
    image_sizes: torch.LongTensor | None = None
    padded_sizes: torch.LongTensor | None = None
    auxiliary_logits: list[dict[str, torch.FloatTensor]] | None = None


@dataclass
class MaftMaskClassificationOutput(ModelOutput):
    r"""
    Output of [`MaftModel.classify_masks`]: given masks named by IP-CLIP.

    class_logits (`torch.FloatTensor` of shape `(batch_size, num_masks, num_classes + 1)`):
        IP-CLIP's logits `logit_scale * cos(f_k, [T; no-object])` of each mask k, as `MaftModelOutput.clip_class_logits`
        for MAFT's proposals. `softmax(class_logits[..., :-1])` are the class scores: MAFT names its proposals without
        the no-object entry (`MaftImageProcessor.post_process_mask_classification`).
    mask_embeds (`torch.FloatTensor` of shape `(batch_size, num_masks, projection_dim)`):
        The L2-normalised IP-CLIP embedding f_k of each mask.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, num_classes, projection_dim)`):
        The L2-normalised, template-ensembled class text embeddings T.
    real_masks (`torch.BoolTensor` of shape `(batch_size, num_masks)`, *optional*):
        Passed through: `True` for the given masks, `False` for the padding of images with fewer masks than others.
    """

    class_logits: torch.FloatTensor | None = None
    mask_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    real_masks: torch.BoolTensor | None = None


class MaftPreTrainedModel(MaftWeightsFileErrorsMixin, PreTrainedModel):
    config: MaftConfig
    config_class = MaftConfig
    base_model_prefix = "maft"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPEncoderLayer", "MaftDecoderLayer", "MaftPixelDecoderLayer"]
    # float16 lacks the range: the pixel decoder stays float32 as under the original's mixed precision; bfloat16 runs
    # it (deformable attention samples in float32) and agrees with float32 as well as a float32 pixel decoder does
    _keep_in_fp32_modules = ["pixel_decoder"]
    supports_gradient_checkpointing = True  # every decoder, pixel-decoder and CLIP layer
    _supports_sdpa = True  # CLIP's attention and IP-CLIP's proposal attention go through the attention interface

    _keys_to_ignore_on_load_unexpected = [r"^distillation_teacher\."]  # checkpoints of maft 0.1.0.dev0 held the teacher

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        if any(key.startswith("distillation_teacher.") for key in loading_info.unexpected_keys):
            logger.info("Dropping the distillation teacher of a checkpoint saved by maft 0.1.0.dev0: stage-2 training makes its own.")
        super()._adjust_missing_and_unexpected_keys(loading_info)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """Every module goes through `_init_weights`, also those that own no parameter (a decoder layer, a ResNet
        block): transformers skips those for code outside its package, but their rules below set their layers'
        weights. Loaded weights stay as loaded: every rule uses the guarded functions of `transformers.initialization`."""
        if not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True

    def _init_weights(self, module: nn.Module) -> None:
        """
        The original's initialisation, module by module (the CLIP towers initialise themselves). Children are
        initialised before their parents, so a module's rule below overrides the generic rules of its layers:
        - linear and convolution layers: PyTorch's defaults (the original keeps them for its MLP heads);
          embeddings N(0, 1) (PyTorch's default: queries, level embeddings); norms 1 and 0;
        - detectron2's ResNet: "c2 MSRA fill" of every convolution (He normal, fan out), frozen batch norm identity;
        - the pixel decoder (Mask2Former): Xavier-uniform input projections with zero bias, "c2 Xavier fill" (He
          uniform, a=1, zero bias) of the FPN and mask-feature convolutions, Xavier-uniform feed-forward weights of the
          deformable layers, the deformable attention's own scheme, level embeddings N(0, 1);
        - the context interaction (GLIP's attention): Xavier-uniform projections with zero bias, layer scale constant;
        - the decoder layers (Mask2Former): Xavier-uniform for every matrix, zero attention biases;
        - the no-object embedding: N(0, text_width ** -0.5), as the original's CLIP adapter.
        """
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FrozenBatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.constant_(module.running_var, 1 - module.eps)
        elif isinstance(module, (MaftDeepLabStem, MaftDeepLabBottleneck)):
            for conv in module.children():
                init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, MultiScaleDeformableAttention):
            module.reset_parameters()
        elif isinstance(module, MaftPixelDecoderLayer):
            init.xavier_uniform_(module.linear1.weight)
            init.xavier_uniform_(module.linear2.weight)
        elif isinstance(module, MaftPixelDecoder):
            init.normal_(module.level_embed)
            for projection in module.input_projections:
                init.xavier_uniform_(projection[0].weight)
                init.zeros_(projection[0].bias)
            for conv in (module.lateral_conv, module.output_conv, module.mask_features):
                init.kaiming_uniform_(conv.weight, a=1)
            init.zeros_(module.mask_features.bias)
        elif isinstance(module, MaftContextInteraction):
            for projection in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                init.xavier_uniform_(projection.weight)
                init.zeros_(projection.bias)
            init.constant_(module.layer_scale, self.config.context_layer_scale_init)
        elif isinstance(module, MaftDecoderLayer):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    init.xavier_uniform_(parameter)
            for attention in (module.cross_attn, module.self_attn):
                init.zeros_(attention.in_proj_bias)
                init.zeros_(attention.out_proj.bias)
        elif isinstance(module, MaftModel):
            init.normal_(module.no_object_embedding, std=self.config.text_config.hidden_size**-0.5)


class MaftModel(MaftPreTrainedModel):
    """
    MAFT for open-vocabulary semantic segmentation (DESIGN.md §2): a proposal generator proposes class-agnostic masks
    and IP-CLIP classifies every proposal against the class names' text embeddings, in one pass each.

    Example:

    ```python
    >>> from maft import MaftModel, MaftProcessor

    >>> processor = MaftProcessor.from_pretrained(path)
    >>> model = MaftModel.from_pretrained(path)
    >>> inputs = processor(images=image, text=["cat", "sofa", "wall"], return_tensors="pt")
    >>> outputs = model(**inputs)
    >>> label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    ```
    """

    def __init__(self, config: MaftConfig):
        super().__init__(config)
        # by model_type: a model loaded as remote code can get its config from another copy of configuration_maft.py
        if config.backbone_config.model_type == MaftDeepLabResNetConfig.model_type:
            self.backbone = MaftDeepLabResNet(config.backbone_config)
        else:
            self.backbone = MaftAutoBackbone(config)
        self.pixel_decoder = MaftPixelDecoder(config, self.backbone.channels)
        self.context_interaction = MaftContextInteraction(config)
        self.decoder = MaftMaskedAttentionDecoder(config)
        self.no_object_embedding = nn.Parameter(torch.empty(1, config.projection_dim))
        self.text_encoder = CLIPTextModelWithProjection(config.text_config)
        self.ip_clip = MaftClipVisionModel(config.vision_config)
        self.post_init()

    @classmethod
    def from_clip_pretrained(cls, clip_name_or_path: str, **config_kwargs) -> "MaftModel":
        """
        A MaftModel whose text encoder and IP-CLIP come from a CLIP checkpoint (a `CLIPModel`
        directory or Hub id, e.g. "openai/clip-vit-base-patch16") and whose proposal generator is freshly initialised:
        the starting point for training. `config_kwargs` set the other `MaftConfig` attributes.
        """
        clip_config = CLIPConfig.from_pretrained(clip_name_or_path)
        # A CLIPModel keeps the projection size at its top level, not in its text config.
        text_config = clip_config.text_config
        text_config.projection_dim = clip_config.projection_dim
        text_encoder = CLIPTextModelWithProjection.from_pretrained(clip_name_or_path, config=text_config)
        vision_kwargs = {key: config_kwargs.pop(key) for key in ("mask_start_layer", "mask_threshold") if key in config_kwargs}
        ip_clip = MaftClipVisionModel.from_pretrained(clip_name_or_path, **vision_kwargs)
        config = MaftConfig(
            text_config=text_encoder.config.to_dict(),
            vision_config=ip_clip.config.to_dict(),
            projection_dim=ip_clip.config.projection_dim,
            **config_kwargs,
        )
        model = cls(config)
        model.text_encoder.load_state_dict(text_encoder.state_dict())
        model.ip_clip.load_state_dict(ip_clip.state_dict())
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        `PreTrainedModel.save_pretrained` (and so `push_to_hub`), whose config also names the
        `zero-shot-image-segmentation` pipeline in `custom_pipelines`: with the code files saved beside it (this
        module, its relative imports, among them `pipeline_maft.py`), `AutoModel` and `pipeline(...)` load the folder
        or Hub repository with `trust_remote_code=True` and transformers alone.
        """
        from .pipeline_maft import custom_pipelines  # a relative import: transformers copies that file with this one

        loaded = self.config.__dict__.pop("custom_pipelines", None)
        self.config.custom_pipelines = custom_pipelines()
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:  # where maft registered its pipeline, that one runs the model in this process (see `MaftConfig`)
            del self.config.custom_pipelines
            if loaded is not None:
                self.config.custom_pipelines = loaded

    def get_text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Class embeddings from prompt tokens (`MaftProcessor.tokenize_class_names`): `input_ids` (..., num_templates,
        length) of each class name in every prompt template -> (..., projection_dim): each prompt embedding
        L2-normalised, averaged over the templates, renormalised. Compute them once per vocabulary and pass them to
        `forward` as `text_embeds` (the text encoder is the costliest part of a call with many classes).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        leading_shape, (num_templates, length) = input_ids.shape[:-2], input_ids.shape[-2:]
        prompt_embeds = self.text_encoder(
            input_ids=input_ids.reshape(-1, length), attention_mask=attention_mask.reshape(-1, length)
        ).text_embeds
        prompt_embeds = F.normalize(prompt_embeds, dim=-1).view(-1, num_templates, prompt_embeds.shape[-1])
        return F.normalize(prompt_embeds.mean(dim=1), dim=-1).view(*leading_shape, -1)

    def class_logits(self, embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """`logit_scale * cos(embeds, [text_embeds; no-object])`: (B, N, D) x (B, C, D) -> (B, N, C + 1)."""
        no_object = self.no_object_embedding.expand(text_embeds.shape[0], -1, -1).to(text_embeds.dtype)
        targets = F.normalize(torch.cat([text_embeds, no_object], dim=1), dim=-1)
        return self.config.logit_scale * F.normalize(embeds, dim=-1) @ targets.transpose(1, 2)

    def propose(self, pixel_values: torch.Tensor, text_embeds: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """
        The proposal generator: backbone-normalised images (B, 3, H, W) and class text embeddings (B, C, D) -> for the
        initial prediction and each decoder layer, `masks_queries_logits` (B, Q, H/4, W/4), `class_embeds` (B, Q, D) and
        in-vocabulary `class_queries_logits` (B, Q, C + 1). The last entry is the final prediction.
        """
        mask_features, multi_scale_features = self.pixel_decoder(self.backbone(pixel_values.to(self.no_object_embedding.dtype)))
        context = torch.cat([text_embeds, self.no_object_embedding.expand(text_embeds.shape[0], -1, -1)], dim=1)
        *multi_scale_features, mask_features = self.context_interaction([*multi_scale_features, mask_features], context)
        return [
            {"masks_queries_logits": masks, "class_embeds": embeds, "class_queries_logits": self.class_logits(embeds, text_embeds)}
            for embeds, masks in self.decoder(multi_scale_features, mask_features)
        ]

    @can_return_tuple
    def classify_masks(
        self,
        clip_pixel_values: torch.Tensor,
        masks: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        real_masks: torch.Tensor | None = None,
    ) -> MaftMaskClassificationOutput:
        r"""
        Names given masks (the user's own, or Segment Anything's) with MAFT's IP-CLIP and text encoder: one IP-CLIP
        pass per image for all its masks. The proposal generator is not run, so there is no ensemble with it: the
        classification is IP-CLIP's, as MAFT's with `ensemble_weight=0`.

        clip_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, clip_height, clip_width)`):
            The images as IP-CLIP sees them (`MaftProcessor(images=..., masks=...)`).
        masks (`torch.Tensor` of shape `(batch_size, num_masks, mask_height, mask_width)`):
            Per image, masks (booleans or probabilities in [0, 1]) on the CLIP view, at any resolution: IP-CLIP resizes
            them to its patch grid (bilinear) and keeps the patches >= `config.vision_config.mask_threshold`.
            `num_masks` may be 0. The processor brings masks given at the image's size to the CLIP view.
        input_ids, attention_mask (`torch.LongTensor`, *optional*):
            The class names in every prompt template, tokenised (`MaftProcessor`), as in `forward`. Or give `text_embeds`.
        text_embeds (`torch.FloatTensor` of shape `(num_classes, projection_dim)` or `(batch_size, num_classes, projection_dim)`, *optional*):
            L2-normalised class embeddings (`get_text_embeddings`), computed once per vocabulary.
        real_masks (`torch.BoolTensor` of shape `(batch_size, num_masks)`, *optional*):
            `True` for given masks, `False` for padding (images of a batch with fewer masks); passed through to the
            output for post-processing. Padding masks are classified like any other, and post-processing drops them.

        Classifying masks is its own method rather than a `mask_proposals=` branch of `forward`, as transformers'
        `OwlViTForObjectDetection.image_guided_detection` is beside its `forward`: it needs neither the backbone's
        `pixel_values` that `forward` requires nor the proposal generator, and returns another output.
        """
        if clip_pixel_values.dim() != 4:
            raise ValueError(f"`clip_pixel_values` must be (batch_size, 3, height, width), got {tuple(clip_pixel_values.shape)}.")
        check_finite_images("clip_pixel_values", clip_pixel_values)
        if real_masks is not None and tuple(real_masks.shape) != tuple(masks.shape[:2]):
            raise ValueError(
                f"`real_masks` must be (batch_size, num_masks) = {tuple(masks.shape[:2])} like the masks, got {tuple(real_masks.shape)}."
            )
        text_embeds = self._class_text_embeddings(input_ids, attention_mask, text_embeds, clip_pixel_values.shape[0])
        mask_embeds = self.ip_clip(clip_pixel_values, mask_proposals=masks, interpolate_pos_encoding=True).proposal_embeds
        return MaftMaskClassificationOutput(
            class_logits=self.class_logits(mask_embeds, text_embeds),
            mask_embeds=F.normalize(mask_embeds, dim=-1),
            text_embeds=text_embeds,
            real_masks=None if real_masks is None else real_masks.bool(),
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        clip_pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        clip_view_sizes: torch.Tensor | None = None,
        seen_classes: torch.Tensor | None = None,
    ) -> MaftModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Backbone-normalised, zero-padded images (`MaftImageProcessor`).
        clip_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, clip_height, clip_width)`):
            The same images as IP-CLIP sees them: CLIP-normalised, resized to the processor's CLIP size.
        input_ids (`torch.LongTensor` of shape `(num_classes, num_templates, length)` or `(batch_size, num_classes, num_templates, length)`):
            Each class name in every prompt template, tokenised (`MaftProcessor`). Or give `text_embeds`.
        attention_mask (`torch.LongTensor`, *optional*): the tokens' attention mask, shaped as `input_ids`.
        text_embeds (`torch.FloatTensor` of shape `(num_classes, projection_dim)` or `(batch_size, num_classes, projection_dim)`, *optional*):
            L2-normalised class embeddings (`get_text_embeddings`), instead of `input_ids`: compute them once per
            vocabulary.
        pixel_mask (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            1 on real pixels, 0 on padding; used by the ensemble to find proposals with no pixel in the image.
        image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            Unpadded (height, width) of each image, passed through to post-processing.
        clip_view_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            The (height, width) of the top-left region of the padded input that each image's CLIP view shows
            (`MaftImageProcessor` gives it). IP-CLIP's mask proposals are taken from that region, so that they line
            up with the view; without it, from the whole padded input (the original's batch view). In inference
            (`model.eval()`), a batch is segmented at these sizes, each image at its own, so that it gets the answer
            it gets alone; training keeps the original's one padded batch.
        seen_classes (`torch.BoolTensor` of shape `(num_classes,)`, *optional*):
            Which classes the proposal generator saw in training (for the ensemble; default: none).
        """
        if clip_pixel_values is None:
            raise ValueError("`clip_pixel_values` is required: pass the output of `MaftProcessor` (or `MaftImageProcessor`).")
        if pixel_values.dim() != 4 or clip_pixel_values.dim() != 4 or pixel_values.shape[0] != clip_pixel_values.shape[0]:
            raise ValueError(
                f"`pixel_values` {tuple(pixel_values.shape)} and `clip_pixel_values` {tuple(clip_pixel_values.shape)} must both "
                "be (batch_size, 3, height, width) with the same batch size."
            )
        check_finite_images("pixel_values", pixel_values)
        check_finite_images("clip_pixel_values", clip_pixel_values)
        text_embeds = self._class_text_embeddings(input_ids, attention_mask, text_embeds, pixel_values.shape[0])
        if self.training or clip_view_sizes is None or pixel_values.shape[0] == 1:
            outputs = self._segment(pixel_values, clip_pixel_values, text_embeds, pixel_mask, clip_view_sizes, seen_classes)
        else:
            outputs = self._segment_each_at_its_size(pixel_values, clip_pixel_values, text_embeds, pixel_mask, clip_view_sizes, seen_classes)
        return MaftModelOutput(**outputs, image_sizes=image_sizes)

    def _segment(self, pixel_values, clip_pixel_values, text_embeds, pixel_mask, clip_view_sizes, seen_classes) -> MaftModelOutput:
        """The batch as one padded input: proposals, IP-CLIP's classification of them and the ensemble."""
        predictions = self.propose(pixel_values, text_embeds)
        final = predictions[-1]
        patch_size = self.config.vision_config.patch_size
        clip_masks = proposal_masks_on_patch_grid(
            final["masks_queries_logits"],
            tuple(pixel_values.shape[-2:]),
            (clip_pixel_values.shape[-2] // patch_size, clip_pixel_values.shape[-1] // patch_size),
            clip_view_sizes,
        )
        proposal_embeds = self.ip_clip(clip_pixel_values, mask_proposals=clip_masks, interpolate_pos_encoding=True).proposal_embeds
        clip_class_logits = self.class_logits(proposal_embeds, text_embeds)
        class_queries_logits = self._ensemble(final, clip_class_logits, pixel_values.shape[-2:], pixel_mask, seen_classes)
        return MaftModelOutput(
            class_queries_logits=class_queries_logits,
            masks_queries_logits=final["masks_queries_logits"],
            proposal_class_logits=final["class_queries_logits"],
            clip_class_logits=clip_class_logits,
            text_embeds=text_embeds,
            proposal_embeds=F.normalize(proposal_embeds, dim=-1),
            auxiliary_logits=[
                {"class_queries_logits": prediction["class_queries_logits"], "masks_queries_logits": prediction["masks_queries_logits"]}
                for prediction in predictions[:-1]
            ],
        )

    def _segment_each_at_its_size(self, pixel_values, clip_pixel_values, text_embeds, pixel_mask, clip_view_sizes, seen_classes) -> MaftModelOutput:
        """
        Inference on a batch: each image is segmented at its own padded size (`clip_view_sizes`), images of equal size
        together, so that it gets the answer it gets alone; the proposal generator of a padded batch would see the
        other images' padding. Mask logits are edge-padded back to the batch's size; `padded_sizes` tells
        post-processing which part is the image's.
        """
        padded_height, padded_width = pixel_values.shape[-2:]
        sizes = [tuple(size) for size in clip_view_sizes.tolist()]
        if any(height > padded_height or width > padded_width for height, width in sizes):
            raise ValueError(f"`clip_view_sizes` {sizes} must fit in the padded input ({padded_height}, {padded_width}).")
        images_of_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            images_of_size.setdefault(size, []).append(index)
        parts, order = [], []
        for (height, width), indices in images_of_size.items():
            chosen = torch.tensor(indices, device=pixel_values.device)
            parts.append(
                self._segment(
                    pixel_values[chosen, :, :height, :width],
                    clip_pixel_values[chosen],
                    text_embeds[chosen],
                    None if pixel_mask is None else pixel_mask[chosen, :height, :width],
                    clip_view_sizes[chosen.to(clip_view_sizes.device)],
                    seen_classes,
                )
            )
            order += indices
        inverse = torch.argsort(torch.tensor(order, device=pixel_values.device))
        mask_size = [max(part.masks_queries_logits.shape[dim] for part in parts) for dim in (-2, -1)]

        def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
            if tensors[0].dim() == 4:
                tensors = [F.pad(masks, (0, mask_size[1] - masks.shape[-1], 0, mask_size[0] - masks.shape[-2]), mode="replicate") for masks in tensors]
            return torch.cat(tensors)[inverse]

        fields = ("class_queries_logits", "masks_queries_logits", "proposal_class_logits", "clip_class_logits", "text_embeds", "proposal_embeds")
        return MaftModelOutput(
            **{field: merge([part[field] for part in parts]) for field in fields},
            padded_sizes=clip_view_sizes,
            auxiliary_logits=[
                {key: merge([part.auxiliary_logits[layer][key] for part in parts]) for key in parts[0].auxiliary_logits[layer]}
                for layer in range(len(parts[0].auxiliary_logits))
            ],
        )

    def _class_text_embeddings(self, input_ids, attention_mask, text_embeds, batch_size: int) -> torch.Tensor:
        """(batch_size, num_classes, projection_dim) from token ids or given embeddings, shared or per image."""
        if (input_ids is None) == (text_embeds is None):
            raise ValueError("Give exactly one of `input_ids` (class names in prompt templates) and `text_embeds`.")
        if input_ids is not None:
            if input_ids.dim() not in (3, 4):
                raise ValueError(
                    "`input_ids` must be (num_classes, num_templates, length) or (batch_size, num_classes, num_templates, "
                    f"length), got {tuple(input_ids.shape)}: tokenise the class names with `MaftProcessor`."
                )
            text_embeds = self.get_text_embeddings(input_ids, attention_mask)
        if text_embeds.dim() == 2:
            text_embeds = text_embeds[None].expand(batch_size, -1, -1)
        if text_embeds.dim() != 3 or text_embeds.shape[0] != batch_size or text_embeds.shape[1] == 0:
            raise ValueError(
                f"The class embeddings must be (num_classes, dim) or ({batch_size}, num_classes, dim) with at least one class, "
                f"got {tuple(text_embeds.shape)}."
            )
        return text_embeds.to(self.no_object_embedding.dtype)

    def _ensemble(self, prediction, clip_class_logits, padded_size, pixel_mask, seen_classes) -> torch.Tensor:
        """
        The final class logits (B, Q, C + 1), such that `softmax(...)[..., :-1]` are the class scores. With
        `ensemble_weight` 0 these are IP-CLIP's; otherwise `p_in^w * p_clip^(1-w)` for seen classes and
        `p_in^(1-w) * p_clip^w` for unseen ones, where a proposal with no pixel >= 0.5 in the image (its mask at the
        padded size) keeps p_clip = 1 (as the original). Both use cosine logits (the original softmaxed raw embeddings
        here: a bug). `prediction` is the proposal generator's final one.
        """
        num_classes = clip_class_logits.shape[-1] - 1
        no_object = clip_class_logits.new_full((*clip_class_logits.shape[:-1], 1), float("-inf"))
        if self.config.ensemble_weight == 0:
            return torch.cat([clip_class_logits[..., :-1], no_object], dim=-1)
        weight = self.config.ensemble_weight
        in_vocabulary = prediction["class_queries_logits"].softmax(dim=-1)[..., :-1]
        clip_scores = clip_class_logits[..., :-1].softmax(dim=-1)
        covered = proposal_masks_from_logits(prediction["masks_queries_logits"], padded_size) > 0.5
        if pixel_mask is not None:
            covered = covered & pixel_mask[:, None].bool()
        has_pixels = covered.flatten(2).any(dim=-1)
        clip_scores = torch.where(has_pixels[..., None], clip_scores, torch.ones_like(clip_scores))
        if seen_classes is None:
            seen_classes = torch.zeros(num_classes, dtype=torch.bool, device=clip_scores.device)
        seen = seen_classes.to(clip_scores.device)[None, None]
        scores = torch.where(
            seen,
            in_vocabulary**weight * clip_scores ** (1 - weight),
            in_vocabulary ** (1 - weight) * clip_scores**weight,
        )
        # softmax(log p, log(1 - sum p)) = p where sum p <= 1; otherwise the scores are renormalised.
        remainder = (1 - scores.sum(dim=-1, keepdim=True)).clamp_min(torch.finfo(scores.dtype).tiny)
        return torch.cat([scores.clamp_min(torch.finfo(scores.dtype).tiny), remainder], dim=-1).log()


# overwrite: each copy of this module (maft's, a model's remote code) registers the same mapping
register_checkpoint_conversion_mapping("MaftClipVisionModel", [PrefixChange(prefix_to_remove="vision_model")], overwrite=True)
AutoModel.register(MaftConfig, MaftModel, exist_ok=True)
AutoModel.register(MaftClipVisionConfig, MaftClipVisionModel, exist_ok=True)
MaftModel.register_for_auto_class("AutoModel")
MaftClipVisionModel.register_for_auto_class("AutoModel")


__all__ = [
    "MaftClipVisionModel",
    "MaftClipVisionModelOutput",
    "MaftMaskClassificationOutput",
    "MaftModel",
    "MaftModelOutput",
    "MaftPreTrainedModel",
    "proposal_attention_mask",
    "proposal_masks_from_logits",
    "proposal_masks_on_patch_grid",
]
