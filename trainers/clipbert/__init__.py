"""ClipBERT (jayleicn/ClipBERT, CVPR 2021): ResNet-50 grid features and a single-stream BERT over
[text; visual tokens], trained on sparsely sampled short clips whose scores are combined.

`config` is torch-free (the launcher reads it); `model` and `weights` need torch and transformers.
"""
