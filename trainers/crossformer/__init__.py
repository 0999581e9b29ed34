"""crossformer trainer: DeBERTa-v2 text, ViT-MAE audio and VideoMAE video encoders fused by a ViT
"crossformer"; MLM, audio and video MAE, video-text matching and contrastive objectives.

`config` is torch-free (the launcher imports it); `model` needs torch and transformers.
"""
