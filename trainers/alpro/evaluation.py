"""Retrieval and QA evaluation for ALPRO.

Retrieval: VTC similarities for every (video, text) pair, then each query's top ``k_test`` candidates
re-scored with the VTM match probability (`Alpro.retrieval_scores`); pairs outside a query's top k are
never found. Upstream scores every pair with VTM (O(N^2) cross-encoder passes); ``k_test=0`` does that
too. Metric names are Singularity's (`retrieval_metrics`): ``vid_r1`` is text-to-video R@1 (the number
papers quote), ``txt_r1`` video-to-text; ``emb_*`` are the same from VTC alone.

QA: accuracy of the argmax class over ans2label, in percent; questions whose answer is outside the
vocabulary count as wrong (upstream's accuracy over the whole test set), and per ``answer_type`` when
the annotation has one (upstream's what/who/how/where/when).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch

from trainers.alpro.model import Alpro, AlproPrompter, AlproQA
from trainers.singularity.evaluation import retrieval_metrics


@torch.no_grad()
def evaluate_retrieval(
    model: Alpro,
    video_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    txt2vid: Sequence[int],
    vid2txt: Sequence[Sequence[int]],
    k_test: int,
    device: torch.device | str,
    *,
    text_batch_size: int = 256,
) -> dict[str, float]:
    """Recall metrics (VTM re-ranked, and ``emb_*`` from VTC) of all texts against all videos.

    video_batches yields (frames (B, T, 3, H, W), video_index (B,)) covering range(len(vid2txt)) once.
    """
    was_training = model.training
    model.eval()
    try:
        num_videos = len(vid2txt)
        text_embeds = torch.cat([
            model.encode_text(text_ids[s : s + text_batch_size].to(device),
                              text_mask[s : s + text_batch_size].to(device))
            for s in range(0, text_ids.shape[0], text_batch_size)
        ])  # fmt: skip
        video_embeds = None
        seen = torch.zeros(num_videos, dtype=torch.bool)
        for frames, index in video_batches:
            embeds = model.encode_video(frames.to(device))
            if video_embeds is None:
                video_embeds = embeds.new_empty((num_videos, *embeds.shape[1:]))
            index = torch.as_tensor(index).long().view(-1)
            seen[index] = True
            video_embeds[index.to(device)] = embeds
        if video_embeds is None or not seen.all():
            raise ValueError(f"video_batches did not cover videos {(~seen).nonzero().view(-1).tolist()[:10]}")
        scores = model.retrieval_scores(video_embeds, text_embeds, text_mask.to(device), k=k_test)
        results = retrieval_metrics(scores["v2t"].cpu(), scores["t2v"].t().cpu(), txt2vid, vid2txt)
        vtc = scores["vtc"].cpu()
        results.update({f"emb_{k}": v for k, v in retrieval_metrics(vtc, vtc.t(), txt2vid, vid2txt).items()})
        return results
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_qa(
    model: AlproQA,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    answer_types: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """Accuracy in percent. batches yields (frames, text_ids, text_mask, label (B,)), label -1 when the
    answer is outside the vocabulary; ``answer_types[i]`` (in batch order) adds ``accuracy_<type>``."""
    was_training = model.training
    model.eval()
    try:
        hits: list[bool] = []
        for frames, ids, mask, labels in batches:
            pred = model.predict(frames.to(device), ids.to(device), mask.to(device)).cpu()
            hits.extend((pred == torch.as_tensor(labels).view(-1)).tolist())
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


@torch.no_grad()
def evaluate_entities(
    prompter: AlproPrompter,
    video_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    captions: Sequence[Sequence[str]],
    entities: Sequence[str],
    device: torch.device | str,
) -> dict[str, float]:
    """How well the prompter's entity prompts name what a video shows: ``entity_acc``, the percentage of
    videos whose most likely entity (over the whole video) is a word of one of its captions, and
    ``entity_chance``, the same for an entity drawn at random. video_batches yields (frames, video_index)
    and captions[v] are the texts of video v."""
    was_training = prompter.training
    prompter.eval()
    try:
        hits, chance = [], []
        for frames, index in video_batches:
            top = prompter.pseudo_labels(frames.to(device))[0].argmax(1).cpu()
            for v, e in zip(torch.as_tensor(index).view(-1).tolist(), top.tolist(), strict=True):
                words = {w for caption in captions[v] for w in caption.split()}
                hits.append(entities[e] in words)
                chance.append(sum(entity in words for entity in entities) / len(entities))
        if not hits:
            raise ValueError("evaluate_entities got no videos")
        return {
            "entity_acc": 100.0 * sum(hits) / len(hits),
            "entity_chance": 100.0 * sum(chance) / len(chance),
        }
    finally:
        prompter.train(was_training)


__all__ = ["evaluate_entities", "evaluate_qa", "evaluate_retrieval"]
