"""Evaluation of the crossformer on a validation csv: text <-> video retrieval and video-text matching.

The seed reports no benchmark (its `VTM_acc` is the text MLM's accuracy). We measure what its two
matching objectives learn, on the validation clips:

- Retrieval from the contrastive features: every text is scored against every clip (its video with its
  own audio) by the cosine of the projected features, as the contrastive loss compares them. With the
  seed's default (`contrastive_loss_before_fusion` False) those features come out of the crossformer,
  so each (text, clip) pair is one fusion pass: N texts x M clips passes (the encoders run once per text
  and per clip). `R@k` in `vid_r*` (text -> video, the headline) and `txt_r*` (video -> text), metric
  names as Singularity's `retrieval_metrics`; `vtm_vid_r*` / `vtm_txt_r*` rank by the VTM logit instead.
- VTM accuracy: each text with its own clip (a match) and with the next clip of the file (not a match),
  classified by the sign of the VTM head's logit margin; chance is 50%.

MAE masks at evaluation (`eval_masks`, default on): the crossformer only ever sees the visible patches
in pretraining, so by default the encoders get masks as in training, drawn per clip from a fixed seed
(the same clip always gets the same mask); off, they see every patch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from trainers.crossformer.model import Crossformer, make_audio_mask, make_video_mask
from trainers.singularity.evaluation import retrieval_metrics

EVAL_MASK_SEED = 1234


def _clip_masks(model: Crossformer, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of clips `index`, each from a generator of its own (independent of batch composition)."""
    audio, video = [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(EVAL_MASK_SEED * 1_000_003 + int(i))
        video.append(make_video_mask(model.config, 1, g))
        audio.append(make_audio_mask(model.config, 1, g))
    return torch.cat(audio), torch.cat(video)


@torch.no_grad()
def pair_score_matrices(
    model: Crossformer,
    clip_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_clips: int,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    device: torch.device | str,
    *,
    eval_masks: bool = True,
    text_batch_size: int = 64,
    pair_batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """(texts, clips) matrices "similarity" and / or "vtm" (see `Crossformer.pair_scores`).

    clip_batches yields (video (B, T, 3, H, W), audio (B, 1, F, L), clip index (B,)) covering
    range(num_clips) once.
    """
    texts = []
    for s in range(0, text_ids.shape[0], text_batch_size):
        texts.append(model.encode_text(text_ids[s : s + text_batch_size].to(device),
                                       text_mask[s : s + text_batch_size].to(device)))  # fmt: skip
    text_states = torch.cat(texts)
    text_mask = text_mask.to(device)
    audio_states = video_states = None
    seen = torch.zeros(num_clips, dtype=torch.bool)
    for video, audio, index in clip_batches:
        index = torch.as_tensor(index).long().view(-1)
        audio_mask, video_mask = _clip_masks(model, index) if eval_masks else (None, None)
        a = model.encode_audio(audio.to(device), None if audio_mask is None else audio_mask.to(device))
        v = model.encode_video(video.to(device), None if video_mask is None else video_mask.to(device))
        if audio_states is None:
            audio_states = a.new_empty((num_clips, *a.shape[1:]))
            video_states = v.new_empty((num_clips, *v.shape[1:]))
        audio_states[index.to(device)], video_states[index.to(device)] = a, v
        seen[index] = True
    if audio_states is None or not seen.all():
        raise ValueError(f"clip_batches did not cover clips {(~seen).nonzero().view(-1).tolist()[:10]}")

    num_texts = text_states.shape[0]
    out: dict[str, torch.Tensor] = {}
    pairs = torch.arange(num_texts * num_clips)
    for chunk in pairs.split(pair_batch_size):
        t, c = (chunk // num_clips).to(device), (chunk % num_clips).to(device)
        scores = model.pair_scores(audio_states[c], text_states[t], text_mask[t], video_states[c])
        for name, values in scores.items():
            if name not in out:
                out[name] = torch.empty(num_texts * num_clips, dtype=torch.float)
            out[name][chunk] = values.float().cpu()
    return {name: values.view(num_texts, num_clips) for name, values in out.items()}


def vtm_accuracy(vtm: torch.Tensor, txt2clip: Sequence[int]) -> float:
    """Percent of right match / no-match calls: each text with its clip, and with the next clip."""
    num_clips = vtm.shape[1]
    rows = torch.arange(vtm.shape[0])
    own = torch.as_tensor(list(txt2clip))
    positives = vtm[rows, own] > 0
    negatives = vtm[rows, (own + 1) % num_clips] <= 0
    return 100.0 * torch.cat([positives, negatives]).float().mean().item()


@torch.no_grad()
def evaluate_matching(
    model: Crossformer,
    clip_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    txt2clip: Sequence[int],
    clip2txt: Sequence[Sequence[int]],
    device: torch.device | str,
    *,
    eval_masks: bool = True,
) -> dict[str, float]:
    """Retrieval R@k from the contrastive similarity (and `vtm_*` from the VTM logit) and `vtm_accuracy`."""
    was_training = model.training
    model.eval()
    try:
        scores = pair_score_matrices(
            model, clip_batches, len(clip2txt), text_ids, text_mask, device, eval_masks=eval_masks
        )
        results: dict[str, float] = {}
        if "similarity" in scores:
            sim = scores["similarity"]
            results.update(retrieval_metrics(sim.t(), sim, txt2clip, clip2txt))
        if "vtm" in scores:
            vtm = scores["vtm"]
            by_vtm = retrieval_metrics(vtm.t(), vtm, txt2clip, clip2txt)
            if "similarity" not in scores:
                results.update(by_vtm)
            results.update({f"vtm_{k}": v for k, v in by_vtm.items()})
            if len(clip2txt) > 1:
                results["vtm_accuracy"] = vtm_accuracy(vtm, txt2clip)
        return results
    finally:
        model.train(was_training)


__all__ = ["evaluate_matching", "pair_score_matrices", "vtm_accuracy"]
