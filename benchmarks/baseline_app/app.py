"""The same sweep as ours, for the baseline: a plain Hydra app over our conf/trainer and
conf/dataset groups (and their schemas), launched by hydra-submitit-launcher, which composes every
job in full and pickles it. The task does nothing: the benchmark times submission only."""

import sys
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launcher.schema import register_configs  # noqa: E402 - torch-free: our config schemas only

register_configs()


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg) -> None:
    return None


if __name__ == "__main__":
    main()
