"""Job configs written by our YAML writer read back exactly, with the same types."""

import math

import yaml

from launcher.yamlout import dumps

SAMPLE = {
    "job": {"sweep_id": "20261121-1200-ab12", "num": 3, "overrides": ["seed=3", "trainer.optim.lr=1e-05"]},
    "seed": 3,
    "trainer": {
        "optim": {"lr": 1e-05, "betas": [0.9, 0.999], "big": 3e20, "neg": -2.5e-7, "whole": 2.0},
        "pretrained": None,
        "hflip": False,
        "amp": "auto",
        "empty_list": [],
        "empty_dict": {},
    },
    "tricky strings": [
        "yes",
        "no",
        "null",
        "1e5",
        "0x10",
        "a: b",
        "- x",
        "#c",
        "",
        " pad ",
        "é",
        'q"uote',
        "0.5",
    ],
    "backend": {
        "setup": ["module load cuda/12.4", "export X='1'"],
        "additional_parameters": {"mail-type": "END"},
    },
    "nested": [{"a": 1}, [1, 2], {"b": {"c": None}}],
}


def test_round_trip_is_exact():
    back = yaml.safe_load(dumps(SAMPLE))
    assert back == SAMPLE
    assert type(back["trainer"]["optim"]["lr"]) is float and type(back["trainer"]["optim"]["whole"]) is float


def test_special_floats():
    back = yaml.safe_load(dumps({"a": math.inf, "b": -math.inf, "c": math.nan}))
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])
