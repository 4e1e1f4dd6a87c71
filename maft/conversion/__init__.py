"""Conversion of the original MAFT / FreeSeg checkpoints and OpenAI CLIP weights into `MaftModel` (`maft convert`)."""
