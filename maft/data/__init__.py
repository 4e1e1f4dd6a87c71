"""Data: segmentation datasets with their recorded class names, and CLIP's tokenizer built from the bundled BPE merges
(no Hub)."""
