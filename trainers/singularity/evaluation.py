"""Retrieval and QA evaluation for Singularity, as upstream (`tasks/retrieval_utils.py`, `tasks/vqa.py`).

Retrieval: dual-encoder (ITC) scores for every (video, text) pair, then the top `k_test` candidates of
every query re-scored by the cross-encoder (ITM); everything outside a query's top k keeps -100.

Metric names follow upstream, with "img" renamed "vid": the prefix names what is *retrieved*.
`txt_r1` is video-to-text (for each video, is a correct caption ranked first?) and `vid_r1` is
text-to-video, the number papers quote as "MSRVTT R@1".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from trainers.singularity.model import Singularity, SingularityQA

RECALL_AT = (1, 5, 10)
_NOT_RANKED = -100.0  # upstream's fill for pairs outside a query's top k


def gt_ranks(scores: torch.Tensor, ground_truth: Sequence[int | Sequence[int]]) -> torch.Tensor:
    """0-based rank of the best-placed correct candidate per query row.

    scores: (queries, candidates). Ties count against the query: every wrong candidate scoring at least
    as high as the best correct one is ranked above it (so pairs left at -100 never count as found).
    """
    gt = torch.zeros(scores.shape, dtype=torch.bool)
    for row, targets in enumerate(ground_truth):
        gt[row, list(targets) if isinstance(targets, Iterable) else [int(targets)]] = True
    scores = scores.detach().float().cpu()
    best = torch.where(gt, scores, torch.tensor(float("-inf"))).max(dim=1).values
    return ((scores >= best[:, None]) & ~gt).sum(dim=1)


def retrieval_metrics(
    v2t_scores: torch.Tensor,
    t2v_scores: torch.Tensor,
    txt2vid: Sequence[int | Sequence[int]],
    vid2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Recall@{1,5,10} in percent for both directions and their means.

    v2t_scores: (videos, texts); t2v_scores: (texts, videos). txt2vid[j]: the video (or videos) of text j;
    vid2txt[i]: the texts of video i.
    """
    out: dict[str, float] = {}
    for name, scores, gt in (("txt", v2t_scores, vid2txt), ("vid", t2v_scores, txt2vid)):
        ranks = gt_ranks(scores, gt)
        for k in RECALL_AT:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
        out[f"{name}_r_mean"] = sum(out[f"{name}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    out["r_mean"] = (out["txt_r_mean"] + out["vid_r_mean"]) / 2
    return out


@torch.no_grad()
def rerank_topk(
    itc_scores: torch.Tensor, k: int, score_pairs: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Re-score each row's top-k columns of `itc_scores` with `score_pairs(row, columns) -> (k,)`;
    all other entries are -100."""
    reranked = torch.full(itc_scores.shape, _NOT_RANKED, dtype=torch.float)
    k = min(k, itc_scores.shape[1])
    for row in range(itc_scores.shape[0]):
        columns = itc_scores[row].topk(k).indices
        reranked[row, columns.cpu()] = score_pairs(row, columns).float().cpu()
    return reranked


@torch.no_grad()
def evaluate_retrieval(
    model: Singularity,
    video_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    txt2vid: Sequence[int | Sequence[int]],
    vid2txt: Sequence[Sequence[int]],
    k_test: int,
    device: torch.device | str,
    *,
    text_batch_size: int = 256,
) -> dict[str, float]:
    """Text<->video retrieval metrics: ITM re-ranked (`txt_r1` ... `r_mean`) and ITC only (`emb_` prefix).

    video_batches yields (frames (B, T, 3, H, W), video_index (B,)) with every index in
    range(len(vid2txt)) exactly once. text_ids/text_mask: (num_texts, L) for all captions.
    Frame features of all videos stay on `device` (as upstream); texts are encoded `text_batch_size`
    at a time and each cross-encoder pass holds `k_test` pairs.
    """
    was_training = model.training
    model.eval()
    try:
        num_videos, num_texts = len(vid2txt), text_ids.shape[0]
        if len(txt2vid) != num_texts:
            raise ValueError(f"txt2vid has {len(txt2vid)} entries for {num_texts} texts")

        text_embeds, text_feats = [], []
        for start in range(0, num_texts, text_batch_size):
            ids = text_ids[start : start + text_batch_size].to(device)
            mask = text_mask[start : start + text_batch_size].to(device)
            embeds, cls = model.encode_text(ids, mask)
            text_embeds.append(embeds)
            text_feats.append(model.text_features(cls))
        text_embeds_all = torch.cat(text_embeds)
        text_feats_all = torch.cat(text_feats)
        text_mask_all = text_mask.to(device)

        # Late fusion scores frames one by one, so it needs them without temporal mixing (upstream).
        per_frame = model.config.eval_frame_ensemble != "concat"
        vision_embeds_all = vision_feats_all = None
        seen = torch.zeros(num_videos, dtype=torch.bool)
        for frames, video_index in video_batches:
            embeds, pooled = model.encode_vision(frames.to(device), per_frame=per_frame)
            feats = model.vision_features(pooled)
            if vision_embeds_all is None:
                vision_embeds_all = embeds.new_empty((num_videos, *embeds.shape[1:]))
                vision_feats_all = feats.new_empty((num_videos, *feats.shape[1:]))
            index = torch.as_tensor(video_index).long().view(-1)
            if seen[index].any():
                raise ValueError(f"video indices seen twice: {index[seen[index]].tolist()}")
            seen[index] = True
            vision_embeds_all[index.to(device)] = embeds
            vision_feats_all[index.to(device)] = feats
        if vision_embeds_all is None or not seen.all():
            missing = (~seen).nonzero().view(-1).tolist()
            raise ValueError(f"video_batches did not cover videos {missing[:10]} (of {num_videos})")

        itc_v2t = model.similarity(vision_feats_all, text_feats_all)  # (videos, texts)

        def video_to_texts(video: int, texts: torch.Tensor) -> torch.Tensor:
            n = texts.shape[0]
            vision = vision_embeds_all[video : video + 1].expand(n, *vision_embeds_all.shape[1:])
            return model.itm_scores(text_embeds_all[texts], text_mask_all[texts], vision)

        def text_to_videos(text: int, videos: torch.Tensor) -> torch.Tensor:
            n = videos.shape[0]
            embeds = text_embeds_all[text : text + 1].expand(n, *text_embeds_all.shape[1:])
            mask = text_mask_all[text : text + 1].expand(n, -1)
            return model.itm_scores(embeds, mask, vision_embeds_all[videos])

        itm_v2t = rerank_topk(itc_v2t, k_test, video_to_texts)
        itm_t2v = rerank_topk(itc_v2t.t(), k_test, text_to_videos)

        results = retrieval_metrics(itm_v2t, itm_t2v, txt2vid, vid2txt)
        itc_only = retrieval_metrics(itc_v2t, itc_v2t.t(), txt2vid, vid2txt)
        results.update({f"emb_{k}": v for k, v in itc_only.items()})
        return results
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_qa(
    model: SingularityQA,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Exact-match accuracy in percent over a fixed answer list (upstream's metric for video QA).

    batches yields (frames, q_ids, q_mask, answer_index (B,)); answer_index is -1 where the true answer
    is not in the list (always wrong). answer_ids/answer_mask: (num_answers, La), each starting with
    [CLS] and ending with the end-of-answer token.
    """
    was_training = model.training
    model.eval()
    try:
        answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
        correct = total = 0
        for frames, q_ids, q_mask, gt in batches:
            pred = model.predict(
                frames.to(device), q_ids.to(device), q_mask.to(device), answer_ids, answer_mask, k
            )
            correct += (pred.cpu() == torch.as_tensor(gt).view(-1)).sum().item()
            total += pred.shape[0]
        if total == 0:
            raise ValueError("evaluate_qa got no questions")
        return {"accuracy": 100.0 * correct / total}
    finally:
        model.train(was_training)


__all__ = ["evaluate_qa", "evaluate_retrieval", "gt_ranks", "rerank_topk", "retrieval_metrics"]
