"""Command-line options generated from config dataclasses: each field an option, its docstring the help.

A field's help is the string literal written under it (as jsonargparse and litgpt read them)::

    sparsity: float = 0.5
    \"\"\"Fraction of the weights to remove from each linear layer.\"\"\"

``field(metadata={"cli": False})`` hides a field that a method fills in itself; ``{"flag": "--a/--b"}``
names a boolean's two flags. Generated options default to ``None`` (not given), so the config's own
default applies and an option given to a method that lacks it can be refused by name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import typer

from prunekit.errors import PrunekitError


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (its bases' too), whitespace folded."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "builtins":
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """The type typer parses for a field, and whether the option repeats (a tuple of strings)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _option_type(inner[0]) if len(inner) == 1 else (str, False)
    if origin in (tuple, list):
        return str, True
    return (annotation if annotation in (int, float, str, bool, Path) else str), False


def option_parameters(
    classes: Iterable[type],
    label: Callable[[type], str] = lambda c: "",
    prefix: str = "",
    unset: bool = True,
    skip: Iterable[str] = (),
) -> list[inspect.Parameter]:
    """One keyword parameter per field name across ``classes`` (but those in ``skip``).

    ``unset``: every option defaults to ``None`` (not given), so the config's own default applies and an
    option given to a class without it can be refused; else fields keep their defaults and those without one
    are required. A field several classes share becomes one option; its help names the classes (``label``)
    that take it. ``prefix`` goes before every name (``lora_`` gives ``--lora-r`` for ``LoraSettings.r``)."""
    owners: dict[str, list[type]] = {}
    for cls in classes:
        for f in cli_fields(cls):
            if f.name not in skip:
                owners.setdefault(f.name, []).append(cls)
    return [_parameter(name, classes_with, label, prefix, unset) for name, classes_with in owners.items()]


def _parameter(name: str, classes: list[type], label, prefix: str, unset: bool) -> inspect.Parameter:
    cls = classes[0]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind, repeated = _option_type(typing.get_type_hints(cls)[name])
    labels = ", ".join(filter(None, dict.fromkeys(label(c) for c in classes)))
    help_text = _shared_help(name, classes, label, unset)
    dashed = (prefix + name).replace("_", "-")
    flag = f.metadata.get("flag") or (f"--{dashed}/--no-{dashed}" if kind is bool else f"--{dashed}")
    default = None if unset else (... if f.default is dataclasses.MISSING else f.default)
    option = typer.Option(default, flag, help=help_text, rich_help_panel=labels or None, show_default=not unset)
    annotation = list[str] if repeated else kind
    if unset or f.default is None:
        annotation = Optional[annotation]
    return inspect.Parameter(prefix + name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _shared_help(name: str, classes: list[type], label, unset: bool) -> str:
    """``labels: docstring (default)``; where the classes sharing a field say different things, each one's
    (``--round-to`` rounds an MLP width for width, a hidden size for slicegpt and hidden)."""
    said: dict[str, list[str]] = {}
    for cls in classes:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        text = field_docs(cls).get(name, "") + (_default_text(f) if unset else "")
        said.setdefault(text, []).append(label(cls))
    parts = [(", ".join(filter(None, dict.fromkeys(owners))), text) for text, owners in said.items()]
    return " | ".join(f"{owners}: {text}" if owners else text for owners, text in parts)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING or f.default in (None, (), False):
        return ""
    value = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    return f" (default: {value})"  # not [..]: rich would read it as markup


def build_config(cls: type, options: dict[str, Any], what: str):
    """``cls(**options)`` from the options that were given; one a ``cls`` does not take is an error naming ``what``."""
    accepted = {f.name for f in cli_fields(cls)}
    given = {k: v for k, v in options.items() if v not in (None, [], ())}
    for name in sorted(given.keys() - accepted):
        raise PrunekitError(f"--{name.replace('_', '-')} does not apply to {what}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def command(fn: Callable, extra: list[inspect.Parameter]) -> Callable:
    """``fn`` with ``extra`` keyword options appended to its signature; typer reads the result."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = signature.replace(parameters=params + list(extra))
    return fn


def read_recipe(path: Path | None) -> dict[str, Any]:
    """A recipe file (YAML or JSON): option names as keys (dashes or underscores), values as on the command line."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PrunekitError(f"cannot read --config {path} ({err.strerror}); pass a YAML or JSON file") from None
    try:
        if Path(path).suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as err:  # both parsers' errors are ValueErrors (yaml's YAMLError is not: caught below)
        raise PrunekitError(f"--config {path} is not valid JSON: {str(err).splitlines()[0]}") from None
    except Exception as err:
        raise PrunekitError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"--config {path} must map option names to values, e.g. 'method: width'")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_recipe(ctx: typer.Context, options: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """``options`` with each one the user did not type taken from ``recipe``; an unknown key is an error."""
    for key in recipe:
        if key not in options:
            raise PrunekitError(f"--config: unknown option {key!r}; use the names of `prunekit {ctx.info_name} --help`")
    # by name: typer may carry its own copy of click, whose ParameterSource is another enum
    typed = {
        k for k in options if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
    }
    return {k: (recipe[k] if k in recipe and k not in typed else v) for k, v in options.items()}


# -- checks every command shares ---------------------------------------------------------------------


def device(device: str) -> str:
    import torch

    from prunekit.distributed import world

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world().size > 1:  # under torchrun: each process its own GPU
        device = f"cuda:{world().local_rank}"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PrunekitError(f"unknown --device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise PrunekitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0...)")
    if parsed.type not in ("cpu", "cuda", "mps") or (parsed.type == "mps" and not torch.backends.mps.is_available()):
        raise PrunekitError(f"--device {device} is not available here; use --device cpu (or cuda, mps where present)")
    return device


def check_json(path: Path | None) -> None:
    """Refuse a --json path that cannot be written, before the work whose result it would hold."""
    if path is not None and path.is_dir():
        raise PrunekitError(f"--json {path} is a folder; pass a file path such as {path / 'result.json'}")
    if path is not None and not path.parent.is_dir():
        raise PrunekitError(f"--json {path}: its folder {path.parent} does not exist or is a file; create it first")


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def at_least(value: int | None, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise PrunekitError(f"{flag} must be at least {minimum}, got {value}")


def friendly(fn):
    """Turn input errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrunekitError as err:
            typer.echo(f"prunekit: error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("prunekit: interrupted; rerun the same command to resume from its checkpoint", err=True)
            raise typer.Exit(130) from None

    return wrapper
