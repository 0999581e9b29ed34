"""The fast per-job composition gives exactly what Hydra's full composition gives."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import open_dict

from launcher.app import CONF_DIR
from launcher.compose import SweepComposer, parse_simple, to_plain
from launcher.plan import job_labels
from launcher.schema import register_configs

JOBS = [
    ["dataset=msrvtt", "seed=7", "trainer.optim.lr=1e-4", "trainer.model.num_frames_test=12"],
    ["dataset=msrvtt", "backend=slurm", "backend.nodes=2", "backend.time_min=30", "backend.partition=null"],
    ["dataset=didemo", "trainer.epochs=3", "trainer.hflip=true", "backend=slurm", "backend.qos=high-prio"],
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
    composer = SweepComposer(loader, master)
    assert to_plain(composer.compose(overrides)) == to_plain(full)
    assert composer.compose_plain(overrides) == to_plain(full)


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


def test_jobs_share_only_what_they_do_not_change(loader_and_master):
    loader, master = loader_and_master
    composer = SweepComposer(loader, master)
    jobs = [composer.compose_plain(["dataset=msrvtt", f"seed={i}", f"trainer.optim.lr={lr}"]) for i, lr in
            [(1, 0.1), (2, 0.2)]]  # fmt: skip
    assert [j["seed"] for j in jobs] == [1, 2]
    assert [j["trainer"]["optim"]["lr"] for j in jobs] == [0.1, 0.2]
    assert jobs[0]["dataset"] is jobs[1]["dataset"], "untouched parts are shared, not copied"
    assert jobs[0]["trainer"] is not jobs[1]["trainer"]


def test_values_converted_by_the_checked_node_fail_like_hydra(loader_and_master):
    loader, master = loader_and_master
    composer = SweepComposer(loader, master)
    composer.compose_plain(["backend=slurm", "backend.nodes=2"])  # checks the key once
    with pytest.raises(ConfigCompositionException, match="backend.nodes=two"):
        composer.compose_plain(["backend=slurm", "backend.nodes=two"])


@pytest.mark.parametrize(
    "line",
    ["a=1", "a=1_000", "a=-3", "a=+4", "a=07", "a=0", "a=true", "a=FALSE", "a=null", "a=Null", "a=abc",
     "a=a-b", "a=a/b", "a=a.b", "a=1e-3", "a=1.5", "a=inf", "a=nan", "a=0x10", "a=True1", "a=_x",
     "x.y_z=3", "a=x y", "a='q'", "a=[1,2]", "a={b:1}", "a=${b}", "+a=1", "~a", "a=", "a=-", "a=1-2"],
)  # fmt: skip
def test_simple_parser_agrees_with_hydras_grammar(line):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    simple = parse_simple(line)
    if simple is None:
        return  # left to Hydra's parser
    override = OverridesParser.create().parse_override(line)
    value = override.value()
    assert simple == (override.key_or_group, value) and type(simple[1]) is type(value)


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
    # A swept URL comes back escaped from Hydra's sweep expansion; the label shows it as typed.
    assert job_labels([[r"trainer.pretrained=gs\://b/x.pth"], ["trainer.pretrained=/w/y"]]) == [
        "trainer.pretrained=gs://b/x.pth",
        "trainer.pretrained=/w/y",
    ]
