"""Retrieval and QA evaluation for ClipBERT.

Retrieval, as upstream (`src/tasks/run_video_retrieval.py`): every (text, video) pair is scored by the
ITM head, the match probability of the clip logits combined over ``num_clips_test`` evenly spaced clips
(`score_agg`). Each video's clips go through the CNN once; only the cross-modal BERT runs per pair, so the
cost is texts x videos x clips short BERT passes. Metric names are Singularity's (`retrieval_metrics`):
``vid_r1`` is text-to-video R@1 (the number papers quote), ``txt_r1`` video-to-text.

QA: accuracy of the argmax over ans2label, in percent; questions whose answer is outside the vocabulary
count as wrong (upstream's accuracy over the whole test set); per ``answer_type`` when the data has one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from trainers.clipbert.model import ClipBertForQA, ClipBertForRetrieval
from trainers.singularity.evaluation import retrieval_metrics


@torch.no_grad()
def itm_scores_from_grid(
    model: ClipBertForRetrieval, grid: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """Match probabilities (V, N) of V videos' grid features (V, C, T, h, w, D) against N texts."""
    v, c = grid.shape[:2]
    n = text_ids.shape[0]
    # Pair (video i, text j) is row i * n + j; each pair runs once per clip.
    pair_grid = grid.repeat_interleave(n, dim=0).flatten(0, 1)
    ids = text_ids.repeat(v, 1).repeat_interleave(c, dim=0)
    mask = text_mask.repeat(v, 1).repeat_interleave(c, dim=0)
    _, pooled = model.transformer.bert(ids, mask, pair_grid)
    clip_logits = model.transformer.classifier(pooled).view(v * n, c, -1)
    logits = model.aggregate(clip_logits)
    return F.softmax(logits.float(), dim=-1)[:, 1].view(v, n)


@torch.no_grad()
def evaluate_retrieval(
    model: ClipBertForRetrieval,
    video_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    txt2vid: Sequence[int],
    vid2txt: Sequence[Sequence[int]],
    device: torch.device | str,
    *,
    pairs_per_pass: int = 512,
) -> dict[str, float]:
    """Recall metrics of all texts against all videos, every pair scored by ITM.

    video_batches yields (frames (B, C, T, 3, H, W), video_index (B,)) covering range(len(vid2txt)) once.
    """
    was_training = model.training
    model.eval()
    try:
        num_videos, num_texts = len(vid2txt), text_ids.shape[0]
        scores = torch.full((num_videos, num_texts), -1.0)
        seen = torch.zeros(num_videos, dtype=torch.bool)
        text_ids, text_mask = text_ids.to(device), text_mask.to(device)
        step = max(1, pairs_per_pass // max(1, model.config.clips.num_clips_test))
        for frames, index in video_batches:
            grid = model.encode_frames(frames.to(device))
            for row, video in enumerate(torch.as_tensor(index).view(-1).tolist()):
                seen[video] = True
                for s in range(0, num_texts, step):
                    scores[video, s : s + step] = itm_scores_from_grid(
                        model, grid[row : row + 1], text_ids[s : s + step], text_mask[s : s + step]
                    )[0].cpu()
        if not seen.all():
            raise ValueError(f"video_batches did not cover videos {(~seen).nonzero().view(-1).tolist()[:10]}")
        return retrieval_metrics(scores, scores.t(), txt2vid, vid2txt)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_qa(
    model: ClipBertForQA,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str,
    answer_types: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """Accuracy in percent. batches are GroupCollate batches (labels -100 when the answer is outside the
    vocabulary); ``answer_types[i]`` (questions in batch order) adds ``accuracy_<type>``."""
    was_training = model.training
    model.eval()
    try:
        hits: list[bool] = []
        for b in batches:
            logits = model(
                b["frames"].to(device), b["text_input_ids"].to(device), b["text_attention_mask"].to(device),
                text_to_video=b["text_to_video"].to(device),
            )["logits"]  # fmt: skip
            hits.extend((logits.argmax(-1).cpu() == b["labels"]).tolist())
        if not hits:
            raise ValueError("evaluate_qa got no questions")
        out = {"accuracy": 100.0 * sum(hits) / len(hits)}
        if answer_types is not None and any(t is not None for t in answer_types):
            by_type: dict[str, list[bool]] = defaultdict(list)
            for hit, kind in zip(hits, answer_types, strict=True):
                by_type[str(kind)].append(hit)
            out.update({f"accuracy_{k}": 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())})
        return out
    finally:
        model.train(was_training)


__all__ = ["evaluate_qa", "evaluate_retrieval", "itm_scores_from_grid"]
