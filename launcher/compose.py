"""Compose one config per job of a sweep, fast.

Hydra's own launchers run the whole composition (defaults list, file loading, merging) for every
job, tens of milliseconds each: about 49 s for a 1000-job sweep through hydra-submitit-launcher.
Most sweeps vary values (`seed=range(1000)`, `trainer.optim.lr=...`) over a handful of
config-group choices (`dataset=didemo,msrvtt`). So:

1. each distinct set of group choices is composed once by Hydra and resolved once to plain Python
   containers (the *template*);
2. each distinct value override is checked once the way Hydra applies it (same parser, same
   errors: unknown key, wrong type), on a copy of the template, which also gives the value after
   type conversion;
3. a job is then the template with its converted values set, copying only the dicts on the paths
   it changes (the rest is shared, read-only, between jobs).

Jobs that need more than that (`+key`, `~key`, or a key that an interpolation of the template
refers to) take the full path: a copy of the template config with Hydra's override code applied.
`tests/unit/test_compose.py` checks both paths against Hydra's own composition.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import ValueNode

_SIMPLE_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_INT = re.compile(r"^[+-]?(0|[1-9](_?[0-9])*)$")
_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-/.]*$")
_NOT_WORDS = {"inf", "nan", "true", "false", "null"}


def parse_simple(line: str) -> tuple[str, Any] | None:
    """`key=value` with a plain dotted key and an int / bool / null / bare-word value, parsed the
    way Hydra's grammar parses it; None for anything else (which then goes to Hydra's parser)."""
    key, sep, raw = line.partition("=")
    if not sep or not _SIMPLE_KEY.match(key):
        return None
    lowered = raw.lower()
    if _INT.match(raw):
        return key, int(raw.replace("_", ""))
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered == "null":
        return key, None
    if _WORD.match(raw) and lowered not in _NOT_WORDS:
        return key, raw
    return None


class _Template:
    """One composition: the config (for the full path) and its resolved plain copy (fast path)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        self.interpolations = _interpolation_texts(cfg)
        self.values: dict[str, tuple[str, Any]] = {}  # override line -> (key, converted value)
        self.nodes: dict[str, ValueNode] = {}  # key -> its node, as checked by Hydra once


def _interpolation_texts(cfg: DictConfig) -> str:
    """Every interpolation string in the config, joined (to spot overrides they depend on)."""
    found: list[str] = []

    def walk(node) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for key, _ in items:
            child = node._get_node(key)
            if (
                isinstance(child, DictConfig | ListConfig)
                and not child._is_none()
                and not child._is_interpolation()
            ):
                walk(child)
            elif child is not None and child._is_interpolation():  # a value or a whole container
                found.append(str(child._value()))

    walk(cfg)
    return "\n".join(found)


class SweepComposer:
    """Builds job configs from override lists; one full Hydra composition per group choice set."""

    def __init__(self, config_loader, master_config: DictConfig) -> None:
        self._loader = config_loader
        self._master = master_config
        self._parser = OverridesParser.create()
        self._templates: dict[tuple[str, ...], _Template] = {}
        self._is_group_cache: dict[str, bool] = {}
        self._parsed: dict[str, Override] = {}
        # Resolve the sweep id once: load_sweep_config copies the master's resolver cache, so
        # every job then shares it.
        _ = master_config.sweep_id

    def _is_group(self, key: str) -> bool:
        if key not in self._is_group_cache:
            self._is_group_cache[key] = key.startswith("hydra/") or self._loader.repository.group_exists(key)
        return self._is_group_cache[key]

    def _parse(self, line: str) -> Override:
        if line not in self._parsed:
            self._parsed[line] = self._parser.parse_override(line)
        return self._parsed[line]

    def split(self, overrides: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
        """Separate config-group overrides (need composition) from value overrides."""
        groups, values = [], []
        for line in overrides:
            simple = parse_simple(line)
            key = simple[0] if simple else self._parse(line).key_or_group
            if self._is_group(key):
                groups.append(line)
            elif not key.startswith("hydra."):  # Hydra's own settings: applied to the master config
                values.append(line)
        return tuple(groups), values

    def _template(self, groups: tuple[str, ...]) -> _Template:
        template = self._templates.get(groups)
        if template is None:
            full = self._loader.load_sweep_config(self._master, list(groups))
            with open_dict(full):
                del full["hydra"]
            template = self._templates[groups] = _Template(full)
        return template

    def _checked_value(self, template: _Template, line: str) -> tuple[str, Any] | None:
        """(key, value as Hydra would store it) for a `key=value` override; None if it needs the
        full path. Hydra checks the first override of each key (its errors, its type rules); later
        values of the same key are converted by the same config node."""
        if line in template.values:
            return template.values[line]
        simple = parse_simple(line)
        if simple is not None:
            key, raw = simple
        else:
            override = self._parse(line)
            if override.is_add() or override.is_delete() or override.is_force_add() or override.package:
                return None
            key, raw = override.key_or_group, override.value()
        if key in template.interpolations:
            return None  # something interpolates it: only a real config resolves that right
        node = template.nodes.get(key)
        if node is None or isinstance(raw, dict | list):
            trial = copy.deepcopy(template.cfg)
            ConfigLoaderImpl._apply_overrides_to_config([self._parse(line)], trial)
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(trial, parent_key) if parent_key else trial
            node = parent._get_node(leaf)
            if isinstance(node, ValueNode):
                template.nodes[key] = node
            value = (
                OmegaConf.to_container(node, resolve=True)
                if not isinstance(node, ValueNode)
                else node._value()
            )
        else:
            try:
                value = node.validate_and_convert(raw)
            except OmegaConfBaseException:
                # Let Hydra raise it, with its message naming the override.
                ConfigLoaderImpl._apply_overrides_to_config([self._parse(line)], copy.deepcopy(template.cfg))
                raise
        template.values[line] = (key, value)
        return key, value

    def compose_plain(self, overrides: Sequence[str]) -> dict[str, Any]:
        """The job's resolved config (without the `hydra` node) as plain containers.

        Parts not changed by the job's overrides are shared with other jobs: treat as read-only.
        """
        groups, values = self.split(overrides)
        template = self._template(groups)
        checked = [self._checked_value(template, line) for line in values]
        if any(c is None for c in checked):
            return to_plain(self.compose(overrides))
        job = dict(template.plain)
        for key, value in checked:
            *parents, leaf = key.split(".")
            node = job
            for part in parents:
                node[part] = dict(node[part])  # copy on write along the path
                node = node[part]
            node[leaf] = copy.deepcopy(value) if isinstance(value, dict | list) else value
        return job

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The job's config (without the `hydra` node) as Hydra would compose it: the full path."""
        groups, values = self.split(overrides)
        cfg = copy.deepcopy(self._template(groups).cfg)
        if values:
            ConfigLoaderImpl._apply_overrides_to_config([self._parse(v) for v in values], cfg)
        return cfg


def to_plain(cfg: DictConfig) -> dict:
    """Resolve interpolations and return plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
