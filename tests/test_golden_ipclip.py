"""IP-CLIP with the original's weights reproduces the original's per-proposal embeddings."""

import pytest
import torch
from torch.nn import functional as F

from golden import golden_ipclip, golden_tensors, relative_error


@pytest.mark.parametrize("case, padded_size", [("infer", (256, 352)), ("train", (320, 320))])
def test_proposal_embeddings_match_the_original(case, padded_size):
    tensors = golden_tensors()
    # The original's IP-CLIP masks: sigmoid of the mask logits upsampled to the padded input (align_corners=True).
    masks = F.interpolate(tensors[f"{case}_pred_masks"], size=padded_size, mode="bilinear", align_corners=True).sigmoid()
    with torch.no_grad():
        output = golden_ipclip()(tensors[f"{case}_ipclip_images"], mask_proposals=masks, interpolate_pos_encoding=True)
    expected = tensors[f"{case}_ipclip_output"]
    assert output.proposal_embeds.shape == expected.shape
    assert relative_error(output.proposal_embeds, expected) < 1e-4


def test_transformers_position_interpolation_does_not_reproduce_the_original():
    tensors = golden_tensors()
    model = golden_ipclip()
    model.config.position_interpolation_align_corners = False
    masks = F.interpolate(tensors["infer_pred_masks"], size=(256, 352), mode="bilinear", align_corners=True).sigmoid()
    with torch.no_grad():
        output = model(tensors["infer_ipclip_images"], mask_proposals=masks, interpolate_pos_encoding=True)
    assert relative_error(output.proposal_embeds, tensors["infer_ipclip_output"]) > 1e-2
