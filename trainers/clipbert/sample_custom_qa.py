"""The generated sample of the generic custom video-QA format (`conf/dataset/custom_qa.yaml`).

The same coloured-shape videos and questions as the msrvtt_qa sample, written the way a user would
bring their own data: one jsonl file per split, one object per line. Half the lines name their video by
``video_id`` (``<media_dir>/<id>.mp4``), the other half by ``video`` (a path under the media dir), so both
spellings stay exercised; every line has ``answer_type`` (what the question asks: colour, shape,
direction or size). There is no answer list: the trainer builds the vocabulary from the training
answers. The field reference is in `trainers/clipbert/data.py`.

Called by `trainers.core.sample_data.generate_sample_data("custom_qa", ...)`; no torch here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainers.core import sample_data as sd

NAME = "custom_qa"


def generate(
    out_dir: Path, sizes: dict[str, int], scale: float, seed: int, progress: Callable[[str], None]
) -> dict:
    """Write the custom_qa sample into ``out_dir``; returns the stamp (written last)."""
    out = Path(out_dir)
    (out / "anno").mkdir(parents=True, exist_ok=True)
    (out / sd.MEDIA_DIR).mkdir(exist_ok=True)
    started = time.perf_counter()
    total, written, next_video = sum(sizes.values()), 0, 0
    dataset_seed = sd.SAMPLE_DATASETS.index(NAME)
    lines: dict[str, int] = {}
    for split_number, (split, n_videos) in enumerate(sizes.items()):
        plan_rng = np.random.default_rng((seed, dataset_seed, split_number))
        planned = sd._plan_motions(plan_rng, n_videos, distinct=not split.startswith("train"))
        rows = []
        for i, motion in enumerate(planned):
            rng = np.random.default_rng((seed, dataset_seed, split_number, i))
            video_id = f"video{next_video}"
            next_video += 1
            background = sd.BACKGROUNDS[int(rng.integers(len(sd.BACKGROUNDS)))]
            frames = sd.render_video(rng, [motion], background, sd.FRAMES_PER_VIDEO[NAME])
            sd.write_video(out / sd.MEDIA_DIR / f"{video_id}.mp4", frames)
            for kind in sd._QUESTIONS:
                question, answer = sd._question(rng, motion, kind)
                where = {"video_id": video_id} if i % 2 == 0 else {"video": f"{video_id}.mp4"}
                rows.append({**where, "question": question, "answer": answer, "answer_type": kind})
            written += 1
            if written % 100 == 0 or written == total:
                progress(f"{NAME}: {written}/{total} videos ({time.perf_counter() - started:.1f}s)")
        (out / "anno" / f"{NAME}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines[split] = len(rows)
    (out / sd.VOCAB_FILE).write_text("\n".join(sd.build_vocab()) + "\n")
    stamp = {
        "name": NAME,
        "format_version": sd.FORMAT_VERSION,
        "scale": scale,
        "seed": seed,
        "videos": sizes,
        "annotations": lines,
        "resolution": sd.RESOLUTION,
        "fps": sd.FPS,
        "frames_per_video": sd.FRAMES_PER_VIDEO[NAME],
        "codec": sd._video_codec(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / sd.STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp
