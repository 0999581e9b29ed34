"""The same sweep as ours, for the baseline: a plain Hydra app over our conf/trainer and
conf/dataset groups, launched by hydra-submitit-launcher (which composes every job in full
and pickles it). The task does nothing: the benchmark times submission only."""

import hydra


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg) -> None:
    return None


if __name__ == "__main__":
    main()
