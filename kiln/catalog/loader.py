"""Load, validate and query a model catalog file."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kiln.catalog.schema import Dialects, DialectTarget, ModelSpec
from kiln.errors import CatalogError, UnknownModel, UnsupportedFormat, UnsupportedTask

DEFAULT_CATALOG = Path(__file__).with_name("default.toml")

# The API's vocabulary; a catalog may allow a subset per model, never a name outside it.
KNOWN_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "heun")
KNOWN_SCHEDULERS = ("simple", "normal", "sgm")


@dataclass(frozen=True)
class Catalog:
    """Every model Kiln can serve, its aliases and the output-format table."""

    models: dict[str, ModelSpec]
    aliases: dict[str, str]
    formats: dict[str, dict[str, tuple[int, int]]]
    path: Path | None = None
    default_model: str = ""
    dialects: Dialects = field(default_factory=Dialects)

    # --- queries -----------------------------------------------------------------------------

    def resolve(self, family: str, model: str) -> ModelSpec:
        """The model named ``family/model``, following an alias; :class:`UnknownModel` otherwise."""
        spec = self.models.get(f"{family}/{model}")
        if spec is not None:
            return spec
        target = self.aliases.get(model)
        if target is not None and target.split("/", 1)[0] == family:
            return self.models[target]
        known = sorted(k.split("/", 1)[1] for k in self.models if k.startswith(f"{family}/"))
        if not known:
            families = sorted({s.family for s in self.models.values()})
            raise UnknownModel(
                f"unknown model family {family!r}; families: {', '.join(families)}",
                details={"families": families},
            )
        aliases = sorted(a for a, t in self.aliases.items() if t.startswith(f"{family}/") and a not in known)
        names = ", ".join(known + [f"{a} (alias)" for a in aliases])
        raise UnknownModel(
            f"unknown model {family}/{model}; {family} has: {names}", details={"models": known, "aliases": aliases}
        )

    def resolve_key(self, key: str) -> ModelSpec:
        """Resolve ``family/model`` (or ``family/alias``) written as one string."""
        family, sep, model = key.partition("/")
        if not sep or not model:
            raise UnknownModel(f"a model is named FAMILY/MODEL (for example flux/schnell), got {key!r}")
        return self.resolve(family, model)

    def resolve_dialect(self, dialect: str, name: str, *, what: str = "model") -> tuple[ModelSpec, DialectTarget]:
        """The catalog model another API's ``name`` stands for (``[dialects.<dialect>]``), with its defaults."""
        names: dict[str, DialectTarget] = getattr(self.dialects, dialect)
        target = names.get(name)
        if target is None:
            known = sorted(names)
            raise UnknownModel(
                f"unknown {what} {name!r}; this server offers: {', '.join(known) or 'none'}", details={what + "s": known}
            )
        return self.resolve_key(target.model), target

    def size_of(self, spec: ModelSpec, fmt: str) -> tuple[int, int]:
        """(width, height) of ``fmt`` for this model; :class:`UnsupportedFormat` if it has no such format."""
        if fmt not in spec.formats:
            raise UnsupportedFormat(
                f"format {fmt!r} is not supported by {spec.key}; use one of: {', '.join(spec.formats)}",
                details={"formats": list(spec.formats)},
            )
        return self.formats[spec.modality][fmt]

    def size_for(self, spec: ModelSpec, fmt: str | None, width: int | None, height: int | None) -> tuple[int, int]:
        """(width, height) a request asks for: a pixel size the model's ``sizes`` range allows, else the
        named format (the model's first when none is named)."""
        if width is None or height is None:
            return self.size_of(spec, fmt or spec.formats[0])
        if spec.sizes is None:
            offered = ", ".join(f"{w}x{h}" for w, h in dict.fromkeys(self.size_of(spec, f) for f in spec.formats))
            raise UnsupportedFormat(
                f"{spec.key} makes only the sizes of its formats ({offered}); {width}x{height} is not one",
                details={"formats": list(spec.formats)},
            )
        if (width, height) not in spec.sizes:
            raise UnsupportedFormat(
                f"{spec.key} takes each side from {spec.sizes.min} to {spec.sizes.max} pixels; got {width}x{height}",
                details={"min": spec.sizes.min, "max": spec.sizes.max},
            )
        return width, height

    def check_task(self, spec: ModelSpec, task: str) -> None:
        if task not in spec.pipelines:
            raise UnsupportedTask(
                f"{spec.key} does not do {task!r}; it does: {', '.join(spec.tasks)}", details={"tasks": spec.tasks}
            )

    def __iter__(self):
        return iter(self.models.values())


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog TOML file (the packaged default when ``path`` is None).

    Raises :class:`CatalogError` naming the file, the entry and the bad value.
    """
    path = Path(path).expanduser().resolve() if path else DEFAULT_CATALOG
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CatalogError(f"catalog file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    return parse_catalog(raw, base_dir=path.parent, path=path)


def parse_catalog(raw: dict[str, Any], *, base_dir: Path, path: Path | None = None) -> Catalog:
    where = str(path) if path else "catalog"
    try:
        return _parse(raw, base_dir, path, where)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        # a table where a list belongs ([models] for [[models]]), a number where a table belongs
        raise CatalogError(f"{where}: malformed ({type(exc).__name__}: {exc}); see the header of default.toml") from exc


def _parse(raw: dict[str, Any], base_dir: Path, path: Path | None, where: str) -> Catalog:
    unknown = set(raw) - {"aliases", "formats", "models", "default_model", "dialects"}
    if unknown:
        raise CatalogError(f"{where}: unknown top-level keys {sorted(unknown)}")
    formats = _parse_formats(raw.get("formats", {}), where)
    models: dict[str, ModelSpec] = {}
    entries = raw.get("models", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CatalogError(f"{where}: models are [[models]] tables")
    for i, entry in enumerate(entries):
        label = f"{where}: models[{i}] ({entry.get('family', '?')}/{entry.get('model', '?')})"
        try:
            spec = ModelSpec.model_validate({**entry, "base_dir": base_dir})
        except ValidationError as exc:
            raise CatalogError(f"{label}: {_first_error(exc)}") from exc
        if spec.key in models:
            raise CatalogError(f"{label}: {spec.key} is listed twice")
        _check_vocabulary(spec, formats, label)
        models[spec.key] = spec
    if not models:
        raise CatalogError(f"{where}: no [[models]] entries")
    aliases = dict(raw.get("aliases", {}))
    for alias, target in aliases.items():
        if target not in models:
            raise CatalogError(f"{where}: alias {alias!r} points at {target!r}, which is not a model in the catalog")
        family = target.split("/", 1)[0]
        if f"{family}/{alias}" in models and f"{family}/{alias}" != target:
            raise CatalogError(f"{where}: alias {alias!r} shadows the model {family}/{alias}")
    default = raw.get("default_model")
    if default is None:
        default = next(iter(models))
    elif default not in models:
        raise CatalogError(f"{where}: default_model {default!r} is not a model in the catalog")
    catalog = Catalog(models=models, aliases=aliases, formats=formats, path=path, default_model=default)
    return _with_dialects(catalog, raw.get("dialects", {}), where)


def _with_dialects(catalog: Catalog, raw: dict[str, Any], where: str) -> Catalog:
    """Other APIs' names for models: each must name an image model, with defaults inside its ranges."""
    try:
        dialects = Dialects.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(f"{where}: dialects: {_first_error(exc)}") from exc
    for dialect in Dialects.model_fields:
        for name, target in getattr(dialects, dialect).items():
            label = f"{where}: [dialects.{dialect}] {name!r}"
            try:
                spec = catalog.resolve_key(target.model)
            except UnknownModel as exc:
                raise CatalogError(f"{label}: {exc.message}") from exc
            if spec.modality != "image":
                raise CatalogError(f"{label}: {spec.key} makes {spec.modality}s; these APIs make images")
            if target.steps is not None and not spec.steps.min <= target.steps <= spec.steps.max:
                raise CatalogError(f"{label}: steps {target.steps} is outside {spec.key}'s {spec.steps.min}..{spec.steps.max}")
            g = spec.guidance
            if target.guidance is not None and not (g.mode == "range" and g.min <= target.guidance <= g.max):  # type: ignore[operator]
                raise CatalogError(f"{label}: guidance {target.guidance} does not fit {spec.key}'s guidance")
    return replace(catalog, dialects=dialects)


def _parse_formats(raw: dict[str, Any], where: str) -> dict[str, dict[str, tuple[int, int]]]:
    out: dict[str, dict[str, tuple[int, int]]] = {"image": {}, "video": {}}
    for modality, table in raw.items():
        if modality not in out:
            raise CatalogError(f"{where}: [formats.{modality}] is not image or video")
        for name, size in table.items():
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 16 <= v <= 8192 for v in size)):
                raise CatalogError(f"{where}: format {name!r} must be [width, height] in 16..8192, got {size!r}")
            if size[0] % 16 or size[1] % 16:
                raise CatalogError(f"{where}: format {name!r} {size[0]}x{size[1]} must be a multiple of 16 on each side")
            out[modality][name] = (size[0], size[1])
    return out


def _check_vocabulary(spec: ModelSpec, formats: dict[str, dict[str, tuple[int, int]]], label: str) -> None:
    missing = [f for f in spec.formats if f not in formats[spec.modality]]
    if missing:
        raise CatalogError(f"{label}: formats {missing} are not in [formats.{spec.modality}]")
    _known(spec.samplers, KNOWN_SAMPLERS, "sampler", label)
    _known(spec.schedulers, KNOWN_SCHEDULERS, "scheduler", label)
    if bool(spec.samplers) != bool(spec.schedulers):
        raise CatalogError(f"{label}: samplers and schedulers are both listed or both empty")


def _known(values: Iterable[str], known: tuple[str, ...], what: str, label: str) -> None:
    bad = [v for v in values if v not in known]
    if bad:
        raise CatalogError(f"{label}: unknown {what} {bad}; known: {', '.join(known)}")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "entry"
    got = err.get("input")
    return f"{loc}: {err['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})")
