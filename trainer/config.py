"""The run configuration: composition and validation of trainer.schema (OmegaConf structured configs).

A recipe YAML may list `defaults:` (other YAML files, merged first, in order), then its own keys,
then `key=value` overrides from the command line. Each source is checked against the schema on its
own, so an error names the file (or the command line) it came from, the allowed values and the
closest valid key. Nothing runs before the whole config is valid.
"""

from __future__ import annotations

import difflib
import functools
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import Field, fields, is_dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qat.io.atomic import write_text
from qat.options import help_of
from qat.spec import SpecError, parse

# The sections live in trainer.schema; importers take them from here, with the loader.
from .schema import (  # noqa: F401
    DataConfig,
    DistributedConfig,
    EvalConfig,
    GenerateConfig,
    LoRAConfig,
    ModelConfig,
    PTQConfig,
    RunConfig,
    TrainConfig,
)


class ConfigError(ValueError):
    """An invalid config; one line naming the key, where it came from, and the fix."""


# ---------------------------------------------------------------------------------------------
# Schema walking.


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@functools.cache  # typing.get_type_hints is slow, and --help walks every section per command
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: (_unwrap(hints[f.name]), f) for f in fields(cls)}


def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_source(node: Any, cls: type, prefix: str, origin: str) -> None:
    """Unknown keys, allowed values and ranges of one source, against schema `cls`."""
    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"{prefix or 'config'} ({origin}) must be a mapping of keys, got {node!r}")
    types = _field_types(cls)
    moved = getattr(cls, "moved_keys", {})
    for key in node.keys():
        full = f"{prefix}{key}"
        if key in moved:
            new = f"{prefix}{moved[key]}"
            raise ConfigError(f"unknown key '{full}' ({origin}): it moved; did you mean '{new}'?")
        if key not in types:
            valid = list(types)
            raise ConfigError(
                f"unknown key '{full}' ({origin}){_did_you_mean(str(key), valid)} "
                f"valid keys of {prefix.rstrip('.') or 'the config'}: {', '.join(valid)}"
            )
        tp, f = types[key]
        value = node[key] if isinstance(node, dict) else OmegaConf.to_container(node, resolve=False)[key]
        if is_dataclass(tp):
            if value is not None:
                _check_source(value, tp, f"{full}.", origin)
            continue
        if value is None:
            continue
        if typing.get_origin(tp) is list and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{full}={value!r} ({origin}) must be a list, e.g. {full}=[{value}]")
        choices = f.metadata.get("choices")
        is_list = typing.get_origin(tp) is list  # a list's choices hold for each item
        bad = [v for v in (value if is_list else [value]) if v not in choices] if choices else []
        if bad:
            what = f"{bad[0]!r} in {full}={list(value)!r}" if is_list else f"{full}={value!r}"
            raise ConfigError(f"{what} ({origin}) is not allowed; allowed values: {', '.join(map(str, choices))}")
        rng = f.metadata.get("range")
        if rng and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = rng
            if not lo <= value <= hi:
                raise ConfigError(f"{full}={value!r} ({origin}) is out of range; allowed values: {lo} to {hi}")


def _expand_scheme(src: dict, origin: str) -> dict:
    """`quant.scheme: w4a8kv8` -> the explicit weight/activation/kv specs, so later keys can adjust them."""
    quant = src.get("quant")
    if not isinstance(quant, dict) or quant.get("scheme") is None:
        return src
    try:
        spec = parse(str(quant["scheme"]))
    except SpecError as e:
        raise ConfigError(f"quant.scheme ({origin}): {e}") from None
    expanded = OmegaConf.to_container(OmegaConf.structured(spec))
    # Keys written next to the scheme in the same source refine it.
    for kind in ("weight", "activation", "kv"):
        if isinstance(quant.get(kind), dict) and expanded[kind] is not None:
            expanded[kind].update(quant[kind])
        elif kind in quant:
            expanded[kind] = quant[kind]
    for key in ("include", "exclude", "overrides"):
        if key in quant:
            expanded[key] = quant[key]
        else:
            expanded.pop(key)
    expanded["scheme"] = None
    return {**src, "quant": expanded}


# ---------------------------------------------------------------------------------------------
# Sources.


def _configs_root(path: Path) -> Optional[Path]:
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return None


def _read_yaml(path: Path, origin: str) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} ({origin}) is a folder; give a recipe file in it, "
                          f"e.g. {next(iter(sorted(path.glob('*.yaml'))), path / 'default.yaml')}")
    if not path.is_file():
        raise ConfigError(f"config file {path} ({origin}) does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # a YAML syntax error: say where, not a traceback
        msg = " ".join(str(e).split())
        raise ConfigError(f"{path} is not valid YAML: {msg}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _load_sources(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The file's defaults (recursively, in order), then the file itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path} includes itself through defaults: {' -> '.join(map(str, seen))}")
    data = _read_yaml(path, "config file")
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"defaults in {path} must be a list of config files")
    out: list[tuple[dict, str]] = []
    for entry in defaults:
        out += _load_sources(_find_default(str(entry), path), seen + (path,))
    out.append((data, str(_display(path))))
    return out


def _find_default(entry: str, including: Path) -> Path:
    name = entry if entry.endswith((".yaml", ".yml")) else entry + ".yaml"
    candidates = [including.parent / name]
    root = _configs_root(including)
    if root is not None:
        candidates.append(root / name)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"defaults entry '{entry}' in {_display(including)} not found; looked at "
        + ", ".join(str(_display(c)) for c in candidates)
    )


def _display(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _parse_overrides(overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not key=value (e.g. quant.weight.bits=4)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {' '.join(str(e).split())}") from None
    except yaml.YAMLError as e:
        # a bare `*` starts a YAML alias: lora.target_modules=[*.q_proj] is the usual way to hit it
        raise ConfigError(f"cannot parse overrides {overrides} as YAML ({' '.join(str(e).split()[:8])}); quote "
                          "values that start with * or &, e.g. \"lora.target_modules=['*.q_proj']\"") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Compose, validate and return the run config (a RunConfig object with QuantSpec inside)."""
    sources = _load_sources(Path(path)) if path is not None else []
    if overrides:
        sources.append((_parse_overrides(overrides), "command line"))
    merged = OmegaConf.structured(RunConfig)
    for data, origin in sources:
        data = _expand_scheme(data, origin)
        _check_source(data, RunConfig, "", origin)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            first = str(e).splitlines()[0]
            raise ConfigError(f"{key} ({origin}): {first}") from None
    try:
        OmegaConf.resolve(merged)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None
    try:
        cfg.quant.check()
    except SpecError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.mode != "qat" and cfg.train.speedups:
        raise ConfigError(f"train.speedups={cfg.train.speedups} apply to train.mode=qat; set train.speedups=[]")
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, out_dir: Union[str, Path], name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs (temp file, then rename)."""
    return write_text(Path(out_dir) / name, to_yaml(cfg))


def _defaults(cls: type = RunConfig, prefix: str = "", instance: Any = None):
    """(dotted key, default, field, section type) of every setting, read from a default instance, so that a
    section whose default is off (quant.activation in a weight-only spec) shows as one key with None."""
    instance = cls() if instance is None else instance
    for name, (tp, f) in _field_types(cls).items():
        full, value = f"{prefix}{name}", getattr(instance, name)
        if is_dataclass(tp) and value is not None:
            yield from _defaults(tp, f"{full}.", value)
        else:
            yield full, value, f, tp if is_dataclass(tp) else None


def _sections(cls: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, Field, type]]:
    """(dotted name, field, type) of every section and subsection ("ptq", "ptq.gptq", "quant.weight")."""
    for name, (tp, f) in _field_types(cls).items():
        if is_dataclass(tp):
            yield f"{prefix}{name}", f, tp
            yield from _sections(tp, f"{prefix}{name}.")


def schema_keys() -> list[str]:
    """Every key `describe_schema` lists, dotted ("quant.weight.bits"; "quant.activation" while it is off)."""
    return [key for key, *_ in _defaults()]


def schema_fields() -> list[tuple[str, Field]]:
    """(dotted name, field) of every key and every section: each carries its help text."""
    keys = [(key, f) for key, _, f, _ in _defaults()]
    return keys + [(name, f) for name, f, _ in _sections()]


@functools.cache
def command_reads(sections: tuple[str, ...], skips: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The key patterns of what a command reads, from the sections its code takes: a section ("model", "ptq.gptq")
    reads all its keys, "section:group" the keys its schema puts in that group (data:text: the text's path and
    field), a plain key itself; `skips` (keys or sections) are left out, written "!pattern"."""
    known = {name: tp for name, _, tp in _sections()}
    out: list[str] = []
    for ref in sections:
        section, _, group = ref.partition(":")
        if group:
            out += [f"{section}.{f.name}" for f in fields(known[section]) if f.metadata.get("group") == group]
        elif section in known:
            out.append(f"{section}.*")
        elif section in dict(schema_fields()):
            out.append(section)
        else:
            raise KeyError(f"{ref!r} is neither a section nor a key of the run config")
    for skip in skips:
        out += [f"!{skip}"] + ([f"!{skip}.*"] if skip in known else [])
    return tuple(out)


def reads(patterns: tuple[str, ...], key: str) -> bool:
    """Whether a command that reads `patterns` ("model.*", "data.path", "!ptq.method") reads `key` (or a section
    holding it)."""
    if any(fnmatchcase(key, p[1:]) for p in patterns if p.startswith("!")):
        return False
    return any(fnmatchcase(key, p) or p.startswith(key + ".") for p in patterns if not p.startswith("!"))


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys a command line sets ("quant.weight.bits=3" -> "quant.weight.bits")."""
    return [item.split("=", 1)[0].strip() for item in overrides]


def _allowed(f: Field) -> str:
    if f.metadata.get("choices"):
        return f"  {{{'|'.join(map(str, f.metadata['choices']))}}}"
    if f.metadata.get("range"):
        lo, hi = f.metadata["range"]
        # The ranges' upper ends of 2^20 and more only keep a typo from asking for an absurd size: not a limit.
        return f"  [>= {lo}]" if hi >= 1 << 20 else f"  [{lo} to {hi}]"
    return ""


def describe_schema(only: Optional[tuple[str, ...]] = None, width: int = 118) -> list[str]:
    """The `--help` listing of options (of the keys matching `only`, when given), grouped by section: a heading
    with each section's help, then each key as `key=default {allowed values}` or `[range]`, its help below."""
    helps = {name: help_of(f) for name, f, _ in _sections()}
    lines: list[str] = []
    heading = None
    for key, value, f, section in _defaults():
        if only is not None and not reads(only, key):
            continue
        parent = key.rpartition(".")[0]
        if parent != heading:
            heading = parent
            lines += textwrap.wrap(f"{parent or 'run'}: {helps.get(parent, 'the run')}", width,
                                   subsequent_indent=" " * 4)
        if section is not None:
            inner = ", ".join(x.name for x in fields(section))
            text = f"{help_of(f)} (off; a scheme turns it on, e.g. quant.scheme=w4a8kv8; its keys: {inner})"
            lines.append(f"  {key}=None")
        else:
            text = help_of(f)
            lines.append(f"  {key}={value}{_allowed(f)}")
        lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


__all__ = ["RunConfig", "ConfigError", "load_config", "save_config", "to_yaml", "describe_schema"]
