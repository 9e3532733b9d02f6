"""Settings added on the command line with `+`: a key that nothing reads is refused, with the known keys it resembles.

Hydra refuses a misspelt key that the config already has (`pruning.keep_ration=0.3`: not in struct), but `+` adds
any key, so `+pruning.keep_ration=0.3` would run and quietly leave the keep ratio at its default. A key added with
`+` (or `++`) must be one of:
- a key of any option of its config group (conf/<group>/*.yaml), or of conf/train.yaml: a user may add a key of
  another option than the chosen one (`+pruning.seed=3` with the learnable selector is read by nobody, but is legal);
- a key that the code reads although no config file sets it (CODE_SETTINGS);
- an argument of the object its section builds: a `_target_` (e.g. `+trainer.gradient_clip_val=1.0` is a
  Lightning Trainer argument) or a section passed as keyword arguments to a class (KWARGS_SECTIONS);
- anything under Hydra's own `hydra.*`, and under the sections whose keys are checked where they are used
  (OPEN_SECTIONS: e.g. sampling.*, whose sampler options the objective checks and names).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl.errors import UsageError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # train.py's config_path, beside the package
# Keys the code reads (with .get or OmegaConf.select) that no file under conf/ sets: none today, every optional
# key read (pruning.resume_from, teacher.name, distill.sigma_k, ...) has a line in some option's file
# (tests/test_bad_input.py checks the cfg.<section>.get("key") and OmegaConf.select(cfg, ...) reads).
CODE_SETTINGS: tuple[str, ...] = ()
# Sections given to a class as keyword arguments without a `_target_`: that class's arguments may be added.
KWARGS_SECTIONS = {
    "pretrain.module": ("tinyfusion_pl.module.DiffusionModule",),
    "recover.module": ("tinyfusion_pl.module.DiffusionModule", "tinyfusion_pl.distill.module.DistillationModule"),
}
# Targets whose **kwargs go to a class: that class's arguments may be added.
KWARGS_TARGETS = {
    "tinyfusion_pl.models.build_dit": "tinyfusion_pl.models.dit.DiT",
    "tinyfusion_pl.models.build_sit": "tinyfusion_pl.models.sit.SiT",
    "tinyfusion_pl.models.build_mar": "tinyfusion_pl.models.mar.MAR",
}
# Sections whose new keys are checked where they are read.
OPEN_SECTIONS = (
    "hydra",              # Hydra checks its own config
    "sampling",           # sampler options: the objective refuses one it lacks, by name (check_sampling)
    "compare.selectors",  # compare.selectors.<name>: a selector run, as changes to `pruning`, checked as it runs
)
# Sections of entries named by the user: a new name is a new entry (e.g. +callbacks.early._target_=...), and the
# keys inside an entry are its _target_'s arguments.
NAMED_ENTRIES = ("callbacks", "logger")


def job_overrides() -> list[str]:
    """The command-line overrides of the Hydra job running now; none when the stages are called from Python."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_added_settings(cfg: DictConfig, overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise a UsageError naming the closest known keys for the first `+key=value` of `overrides` that nothing reads."""
    known = known_settings(Path(conf_dir))
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not (override.is_add() or override.is_force_add()) or override.package is not None:
            continue
        key = override.key_or_group
        if "/" in key or (Path(conf_dir) / key).is_dir() or key.split(".")[0] == "hydra":
            continue  # +experiment=smoke, +hydra/launcher=joblib: a config group option, which Hydra checks
        unknown = unknown_part(cfg, key, known)
        if unknown is not None:
            raise UsageError(describe(override.input_line.split("=", 1)[0], key, unknown, cfg, known))


def unknown_part(cfg: DictConfig, key: str, known: frozenset[str]) -> str | None:
    """The first part of `key` (a dotted path) that is no known setting, or None when the whole key is legal."""
    parts = key.split(".")
    for depth in range(len(parts)):
        path = ".".join(parts[:depth + 1])
        if path in known:
            continue
        parent = ".".join(parts[:depth])
        if parent in (*OPEN_SECTIONS, *NAMED_ENTRIES) or parent.startswith(tuple(f"{s}." for s in OPEN_SECTIONS)):
            return None
        arguments = section_arguments(cfg, parent)
        if arguments is None or parts[depth] in arguments:
            return None  # an argument of the object the section builds (its own arguments are its business)
        return path
    return None


def section_arguments(cfg: DictConfig, section: str) -> frozenset[str] | None:
    """The arguments of what `section` is passed to (None: any keyword), or no arguments for a plain section."""
    node = OmegaConf.select(cfg, section) if section else cfg
    targets: tuple[str, ...] = KWARGS_SECTIONS.get(section, ())
    if isinstance(node, DictConfig) and isinstance(node.get("_target_"), str):
        targets = (KWARGS_TARGETS.get(node._target_, node._target_),)
    arguments: set[str] = set()
    for target in targets:
        accepted = target_arguments(target)
        if accepted is None:
            return None
        arguments |= accepted
    return frozenset(arguments)


@cache
def target_arguments(target: str) -> frozenset[str] | None:
    """The keyword arguments a class or function takes; None when it takes any (**kwargs) or cannot be found.

    A class whose **kwargs go to its base class (DistillationModule's to DiffusionModule) takes the base's too.
    """
    try:
        found = get_object(target)
    except Exception:  # noqa: BLE001 - a target that cannot be imported is refused when it is built, with its reason
        return None
    callables = [base.__init__ for base in found.__mro__ if "__init__" in vars(base)] if isinstance(found, type) \
        else [found]
    arguments: set[str] = set()
    for function in callables:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        arguments |= {parameter.name for parameter in parameters if parameter.name != "self" and parameter.kind in
                      (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
            return frozenset(arguments)
    return None  # **kwargs all the way down (or a function's): anything may be passed on


@cache
def known_settings(conf_dir: Path) -> frozenset[str]:
    """Every key (dotted, with all its prefixes) of every config file under `conf_dir`, and CODE_SETTINGS."""
    keys = set()
    for path in sorted(conf_dir.rglob("*.yaml")):
        group = path.parent.relative_to(conf_dir).as_posix()
        global_package = group == "." or "@package _global_" in path.read_text().split("\n", 1)[0]
        prefix = "" if global_package else group.replace("/", ".") + "."
        keys |= {".".join(prefix.split(".")[:depth]) for depth in range(1, prefix.count(".") + 1)}
        keys |= {prefix + key for key in key_paths(OmegaConf.to_container(OmegaConf.load(path)))}
    for key in CODE_SETTINGS:
        keys |= {".".join(key.split(".")[:depth]) for depth in range(1, key.count(".") + 2)}
    return frozenset(keys - {"defaults"})


def key_paths(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return set()
    paths = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths |= {path, *key_paths(value, path + ".")}
    return paths


def describe(written: str, key: str, unknown: str, cfg: DictConfig, known: frozenset[str]) -> str:
    """The message: which part is unknown, the known keys closest to it, and the fix."""
    parent, _, name = unknown.rpartition(".")
    siblings = {path.rpartition(".")[2] for path in known if path.rpartition(".")[0] == parent}
    siblings |= section_arguments(cfg, parent) or set()
    siblings -= {"_target_", "defaults"}
    where = f"of {parent}" if parent else "of the config"
    what = "setting" if unknown == key else "section"
    close = [f"{parent}.{match}" if parent else match
             for match in difflib.get_close_matches(name, sorted(siblings), n=3, cutoff=0.6)]
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    listing = "" if close else f" Known keys {where}: {', '.join(sorted(siblings))}."
    return (f"{written} is not a {what} {where}{hint}. Nothing reads it, so the run would ignore it: correct the "
            f"name (+ adds a key the config lacks; a setting the config has is changed without +).{listing}")
