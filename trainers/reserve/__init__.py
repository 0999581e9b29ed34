"""MERLOT Reserve trainer (JAX/Flax): ViT frame encoder, spectrogram encoder, span encoder and a joint
transformer with rotary position embeddings, trained with the contrastive span objective and finetuned
for multiple-choice video QA (TVQA, Social-IQ 2.0).

`config` is jax-free (the launcher imports it); `model` and `weights` need jax and flax.
"""
