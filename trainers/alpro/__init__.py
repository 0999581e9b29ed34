"""ALPRO trainer: TimeSformer video encoder, BERT whose upper layers fuse [text; video], VTC/VTM/MLM.

`config` is torch-free (the launcher imports it); `model` and `weights` need torch and transformers.
"""
