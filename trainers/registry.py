"""What each trainer family is, without importing it (the launcher reads this; no torch here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    module: str  # run on the node as `python -m <module> <run_dir>/config.yaml`
    tasks: tuple[str, ...]  # dataset tasks it trains on
    framework: str  # torch | jax
    config_module: str  # torch-free module with `TrainConfig`, `resolve(trainer, dataset)`
    default_dataset: str | None = None  # `trainer=<family>` without `dataset=` means this dataset


FAMILIES: dict[str, Family] = {
    "singularity": Family(
        module="trainers.singularity",
        tasks=("retrieval", "qa"),
        framework="torch",
        config_module="trainers.singularity.config",
    ),
    "alpro": Family(
        module="trainers.alpro",
        tasks=("retrieval", "qa", "pretrain_captions"),
        framework="torch",
        config_module="trainers.alpro.config",
    ),
    "clipbert": Family(
        module="trainers.clipbert",
        tasks=("retrieval", "qa"),
        framework="torch",
        config_module="trainers.clipbert.config",
    ),
    "crossformer": Family(
        module="trainers.crossformer",
        tasks=("pretrain",),
        framework="torch",
        config_module="trainers.crossformer.config",
    ),
    "reserve": Family(
        module="trainers.reserve",
        tasks=("mc_qa",),
        framework="jax",
        config_module="trainers.reserve.config",
        default_dataset="tvqa",
    ),
}
