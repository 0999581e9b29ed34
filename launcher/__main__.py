"""`python -m launcher [-m] [group=option ...] [key=value ...] [--dry-run] [--wait] [--detach]`

Before Hydra sees the command line we (1) turn `--dry-run` / `--wait` / `--detach` into config values and
(2) make `backend=X` and `hydra/launcher=X` one choice: giving either selects both, giving
both with different values is an error. Errors of composition come back as one line that
names the valid keys or options.
"""

from __future__ import annotations

import os
import sys

from launcher.errors import LaunchError

_FLAGS = {"--dry-run": "dry_run=true", "--wait": "wait=true", "--detach": "detach=true"}


def _value_of(args: list[str], key: str) -> str | None:
    for a in args:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return None


# Hydra's flags that take a value (the next word); its others (-m, --resolve, ...) take none.
_HYDRA_VALUE_FLAGS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
)

_INFO_TOPICS = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})


def _flags_first(args: list[str]) -> list[str]:
    """Hydra's flags before the overrides, wherever they were typed: Hydra's parser takes them only
    there (`dataset=msrvtt -m seed=1,2` would be refused with a usage screen)."""
    flags, overrides, last, i = [], [], [], 0
    while i < len(args):
        word = args[i]
        follows = args[i + 1] if i + 1 < len(args) else None
        if word in ("--info", "-i"):  # its topic is optional: without one it goes last, or the next
            takes_value = follows in _INFO_TOPICS  # word would be taken for a topic
            (flags if takes_value else last).extend(args[i : i + 1 + takes_value])
        elif word.startswith("-") and "=" not in word:
            takes_value = word in _HYDRA_VALUE_FLAGS and follows is not None
            flags.extend(args[i : i + 1 + takes_value])
        else:
            takes_value = False
            overrides.append(word)
        i += 1 + takes_value
    return flags + overrides + last


def normalise(args: list[str]) -> list[str]:
    """Expand our flags, put Hydra's first and tie `backend=` to `hydra/launcher=`."""
    args = _flags_first([_FLAGS.get(a, a) for a in args])
    if _value_of(args, "detach") == "true" and _value_of(args, "wait") == "true":
        raise LaunchError(
            "--detach and --wait contradict each other: --wait blocks until the jobs end, --detach "
            "returns at once; give one"
        )
    backend = _value_of(args, "backend")
    plugin = _value_of(args, "hydra/launcher")
    for value, what in ((backend, "backend"), (plugin, "hydra/launcher")):
        if value is not None and ("," in value or "(" in value):
            raise LaunchError(f"{what}={value}: a sweep runs on one backend; give a single value")
    if backend and plugin and backend != plugin:
        raise LaunchError(
            f"backend={backend} and hydra/launcher={plugin} disagree; they are the same choice, give one of them"
        )
    trainer = _value_of(args, "trainer")
    if trainer and "," not in trainer and _value_of(args, "dataset") is None:
        from trainers.registry import FAMILIES

        family = FAMILIES.get(trainer)
        if family is not None and family.default_dataset:
            args.append(
                f"dataset={family.default_dataset}"
            )  # conf/config.yaml's default is for torch families
    if backend and not plugin:
        args.append(f"hydra/launcher={backend}")
    elif plugin and not backend:
        args.append(f"backend={plugin}")
    return args


HELP = """\
launcher: send training sweeps of video-language models to this machine, Slurm or TPU pods.

Usage: python -m launcher [-m] [group=option ...] [key=value ...] [--dry-run] [--wait] [--detach]

  -m, --multirun   sweep: comma lists (dataset=didemo,msrvtt) become one job each
  --dry-run        print the plans (sbatch scripts, commands) and submit nothing
  --wait           on Slurm, block until the jobs end and print the results table
  --detach         local and TPU: run the jobs in the background and return at once
                   (vlaunch-ctl status / logs / cancel follow them)
  --cfg job        print the composed config (Hydra); --info, --hydra-help: Hydra's own

Config groups (choose with group=option):
{groups}
backend=X and hydra/launcher=X are the same choice. Values: key=value (backend.partition=gpu,
trainer.preset=base, dataset.data_root=/data/msrvtt). Your cluster's defaults: conf/site/*.yaml, site=NAME.

Examples:
  python -m launcher -m trainer=singularity dataset=didemo,msrvtt             # local: runs, then results
  python -m launcher -m trainer=singularity dataset=didemo,msrvtt backend=slurm --wait
  python -m launcher trainer=singularity dataset=msrvtt backend=slurm --dry-run
"""


def print_help() -> None:
    """Our own --help: Hydra's lists every internal group and takes about a second."""
    from pathlib import Path

    conf = Path(__file__).resolve().parent.parent / "conf"
    lines = []
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.stem for f in (conf / group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    print(HELP.format(groups="\n".join(lines)))


def main() -> None:
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print_help()
        return
    from launcher import sweep

    sweep.USER_ARGS = list(args)
    try:
        args = normalise(args)
    except LaunchError as e:
        _die(str(e))
    # Let Hydra raise instead of printing its multi-line report, so we can print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *args]
    from launcher.app import main as app_main

    try:
        app_main()
    except LaunchError as e:
        _die(str(e))
    except Exception as e:  # noqa: BLE001 - composition errors come in many types
        message = _explain(e, args)
        if message is None:
            raise
        _die(message)
    sys.exit(sweep.EXIT_STATUS)


def _die(message: str) -> None:
    from launcher.sweep import fail

    sys.exit(fail(message))


def _explain(error: Exception, args: list[str]) -> str | None:
    """One line for the errors a user causes at compose time; None for anything else (a bug)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException):
        return _missing_option(error)
    if isinstance(error, OverrideParseException):
        return _unparsable(args) or f"cannot parse the command line: {str(error).splitlines()[0]}"
    if not isinstance(error, ConfigCompositionException | OmegaConfBaseException):
        return None
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None)
    text = str(error).splitlines()[0]
    if key and "not in" in str(cause).splitlines()[0]:
        return _unknown_key(key, args)
    detail = str(cause).splitlines()[0] if cause is not error else ""
    return f"{text} {detail}".strip()


def _unparsable(args: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_override(arg)
        except Exception as e:  # noqa: BLE001
            reason = str(e).splitlines()[0]
            return (
                f"cannot parse '{arg}' ({reason}); quote values holding = [ ] , or spaces, "
                "e.g. backend.srun_args=\"['--cpu-bind=none']\""
            )
    return None


def _missing_option(error) -> str:
    text = str(error)
    options = getattr(error, "options", None) or []
    group = None
    for line in text.splitlines():
        if line.startswith("Available options in"):
            group = line.split("'")[1]
    if "Could not find '" in text:
        missing = text.split("Could not find '")[1].split("'")[0]
        group = group or missing.rsplit("/", 1)[0]
        choice = missing.rsplit("/", 1)[-1]
        if options:
            return f"unknown {group} '{choice}'; choose one of: {', '.join(sorted(options))}"
        return f"unknown {group} '{choice}'"
    return text.splitlines()[0]


def _unknown_key(full_key: str, args: list[str]) -> str:
    """Name the bad key and the valid keys beside it (composing again without the bad override)."""
    parent, _, leaf = full_key.rpartition(".")
    valid = _sibling_keys(parent, [a for a in args if not a.startswith((full_key + "=", "+", "~"))])
    where = f"'{parent}'" if parent else "the top level"
    hint = f"; valid keys in {where}: {', '.join(valid)}" if valid else ""
    return f"unknown key '{full_key}'{hint}"


def _sibling_keys(parent: str, args: list[str]) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig, OmegaConf

    from launcher.app import CONF_DIR
    from launcher.schema import register_configs

    # Compose with the first value of any sweep, without Hydra's own flags.
    simple = [a.split(",")[0] for a in args if "=" in a and not a.startswith("-")]
    GlobalHydra.instance().clear()
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=simple)
    except Exception:  # noqa: BLE001 - best effort: the plain message is still right
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


if __name__ == "__main__":
    main()
