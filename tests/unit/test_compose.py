"""The fast per-job composition gives exactly what Hydra's full composition gives."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import open_dict

from launcher.app import CONF_DIR
from launcher.compose import SweepComposer, to_plain
from launcher.plan import job_labels
from launcher.schema import register_configs

JOBS = [
    ["trainer=singularity", "dataset=didemo"],
    ["trainer=singularity", "dataset=msrvtt", "seed=3"],
    ["dataset=msrvtt", "backend=slurm", "hydra/launcher=slurm", "backend.nodes=2", "backend.partition=gpu"],
    ["dataset=msrvtt_qa", "backend=slurm", "backend.setup=[module load cuda]", "trainer.preset=base"],
    ["dataset=didemo", "site=local_slurm", "backend=slurm", "+extra_note=hello"],
]


@pytest.fixture()
def loader_and_master():
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides=[], run_mode=RunMode.MULTIRUN)
        _ = master.hydra.sweep.dir  # as Hydra's sweeper does first: this fixes the sweep id
        yield loader, master
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("overrides", JOBS, ids=[" ".join(j) for j in JOBS])
def test_fast_compose_equals_full_compose(loader_and_master, overrides):
    loader, master = loader_and_master
    full = loader.load_sweep_config(master, overrides)
    with open_dict(full):
        del full["hydra"]
    fast = SweepComposer(loader, master).compose(overrides)
    assert to_plain(fast) == to_plain(full)


def test_templates_are_not_shared_between_jobs(loader_and_master):
    loader, master = loader_and_master
    composer = SweepComposer(loader, master)
    a = composer.compose(["dataset=didemo", "seed=1"])
    b = composer.compose(["dataset=didemo", "seed=2"])
    assert (a.seed, b.seed) == (1, 2)
    assert len(composer._templates) == 1, "same group choices must be composed once"


def test_every_job_of_a_sweep_shares_the_sweep_id(loader_and_master):
    loader, master = loader_and_master
    composer = SweepComposer(loader, master)
    ids = {to_plain(composer.compose(job))["sweep_id"] for job in JOBS}
    assert ids == {str(master.sweep_id)}


def test_value_override_errors_are_hydras(loader_and_master):
    loader, master = loader_and_master
    with pytest.raises(ConfigCompositionException, match="backend.partitio"):
        SweepComposer(loader, master).compose(["backend=slurm", "backend.partitio=x"])


def test_job_labels_show_what_differs():
    labels = job_labels(
        [["trainer=singularity", "dataset=didemo"], ["trainer=singularity", "dataset=msrvtt"]]
    )
    assert labels == ["dataset=didemo", "dataset=msrvtt"]
    assert job_labels([["backend=slurm", "dataset=msrvtt"]]) == ["dataset=msrvtt"]
