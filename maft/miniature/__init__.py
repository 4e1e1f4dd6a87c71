"""A miniature of the whole MAFT pipeline, trained from scratch on CPU: a procedural world of textured regions and
coloured shapes (`world`), a BPE tokenizer learnt from its captions (`tokenizer`), contrastive pre-training of a small
CLIP (`clip_pretraining`), and `reproduce` which runs both training stages and compares MAFT with frozen CLIP on
classes never seen in segmentation training (`maft reproduce-mini`). It also makes the model the package ships."""
