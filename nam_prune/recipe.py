"""The YAML recipe that drives a whole run, validated into typed dataclasses.

``load_recipe(path, ["prune.macs_keep=0.4"])`` reads the file, applies dotted overrides
(values parsed as YAML) and validates everything with the same one-line errors. Model
families may add a section of their own (``yolo:``); it is validated by their dataclass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nam_prune.config import bounded, from_dict, printable
from nam_prune.data import DataConfig
from nam_prune.errors import NamPruneError
from nam_prune.export import ExportConfig
from nam_prune.measure import ReportConfig
from nam_prune.models import families
from nam_prune.prune import PruneConfig
from nam_prune.recalibrate import RecalibrateConfig
from nam_prune.surgery import NAMConfig
from nam_prune.train import TrainConfig


@dataclass
class ModelConfig:
    """name: a CIFAR ResNet, torchvision name, ``timm:NAME``, ``module:factory``, or a YOLO
    yaml (``yolov8n.yaml``) / ultralytics ``.pt`` (then the ``yolo:`` section applies).
    width: base width of the CIFAR ResNets. weights: a state dict or nam-prune checkpoint to start from.
    pretrained: start from published weights: a torchvision weight name (``DEFAULT``,
    ``IMAGENET1K_V2``) or, for timm, ``DEFAULT`` or a tag; read from torch's hub cache offline.
    trust_pickle: allow ``weights`` to be a pickled file (a whole saved model); it can run code.
    """

    name: str = "resnet20"
    width: int = bounded(16, low=1)
    weights: str = ""
    pretrained: str = ""
    trust_pickle: bool = False


def _sparsity_defaults() -> TrainConfig:
    return TrainConfig(epochs=0, penalty=5e-3)


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    device: str = "auto"
    output: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    nam: NAMConfig = field(default_factory=NAMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: TrainConfig = field(default_factory=_sparsity_defaults)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recalibrate: RecalibrateConfig = field(default_factory=RecalibrateConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sections: dict[str, Any] = field(default_factory=dict)
    """Model families' own sections, by name (``sections["yolo"]``), validated by their dataclasses."""

    def __post_init__(self) -> None:
        opening = self.finetune.open_gates
        if self.sparsity.open_gates:
            raise NamPruneError("sparsity.open_gates: gates are opened after the cut; set finetune.open_gates instead")
        if opening and not self.prune.strip_gates:
            raise NamPruneError("finetune.open_gates opens the gates so they can be stripped: set prune.strip_gates: true")
        if opening > self.finetune.epochs:
            raise NamPruneError(
                f"finetune.open_gates is {opening} but finetune.epochs is {self.finetune.epochs}: "
                "the gates must be fully open before fine-tuning ends; lower it or add epochs"
            )
        if opening and self.nam.compile:
            raise NamPruneError(
                "finetune.open_gates changes the gates at every step, which torch.compile would recompile for: "
                "set nam.compile: false or finetune.open_gates: 0"
            )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain values, laid out like its YAML (family sections at the top level)."""
        tree = asdict(self)
        sections = tree.pop("sections")
        return {**tree, **sections}


def family_sections() -> dict[str, type]:
    """Recipe sections that model families add: name -> config dataclass."""
    return dict(family.section for family in families() if family.section)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise NamPruneError(f"override '{printable(dotted)}': '{printable(key)}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings to (key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise NamPruneError(
                f"override '{printable(item)}' must look like section.key=value, e.g. prune.macs_keep=0.4"
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def recipe_from_dict(tree: Any, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise NamPruneError(f"a recipe must be a YAML mapping of sections, got {type(tree).__name__}")
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}  # overrides never touch the input
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    if "sections" in tree:
        raise NamPruneError("unknown key 'sections' in recipe; put a family's section at the top level (yolo:)")
    extra = family_sections()
    given = {name: tree.pop(name) for name in extra if name in tree}
    recipe = from_dict(Recipe, tree)
    recipe.sections = {name: from_dict(cls, given.get(name), prefix=f"{name}.") for name, cls in extra.items()}
    if recipe.name in ("", ".", "..") or "/" in recipe.name or "\\" in recipe.name:
        raise NamPruneError(f"name {printable(recipe.name)!r} must be a plain folder name under runs/; use output: for a path")
    for family in families():
        if family.section and family.section[0] in given and not family.claims(recipe.model.name):
            raise NamPruneError(
                f"the {family.section[0]}: section is for {family.name} models and model.name is "
                f"{printable(recipe.model.name)!r}: remove the section or pick a {family.name} model"
            )
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise NamPruneError(f"recipe {path} not found; the shipped ones are in recipes/")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise NamPruneError(f"recipe {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from error
    except UnicodeDecodeError as error:
        raise NamPruneError(f"recipe {path} is not a text file") from error
    if tree is None:
        raise NamPruneError(f"recipe {path} is empty; start from a shipped one, e.g. recipes/fashion_quickstart.yaml")
    return recipe_from_dict(tree, overrides)


def _with_defaults(stored: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with the keys it lacks taken from ``defaults``, section by section: a file written
    before a recipe key existed ran with what is now that key's default."""
    merged = dict(defaults)
    for key, value in stored.items():
        both_sections = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        merged[key] = _with_defaults(value, defaults[key]) if both_sections else value
    return merged


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(stored) | set(current)):
        there, here = stored.get(key), current.get(key)
        if isinstance(there, dict) and isinstance(here, dict):
            found += _differences(there, here, f"{prefix}{key}.")
        elif there != here:
            found.append(f"{prefix}{key}: {printable(repr(there))} there, {printable(repr(here))} here")
    return found


def changed_keys(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """Where a recipe dict saved earlier (read :func:`as_stored_today`) differs from ``current``, as
    ``section.key: A there, B here`` for up to three keys, or ``""``: what an error about a stored
    recipe names, so the user knows which override brings it back."""
    return "; ".join(_differences(as_stored_today(stored), current)[:3])


def as_stored_today(stored: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict saved by an earlier version (in ``last.pt``, ``compare.json``) as ``to_dict``
    writes it today: keys added since take their defaults, and the ``sections`` copy older files
    kept beside the family sections goes."""
    defaults = {**Recipe().to_dict(), **{name: asdict(cls()) for name, cls in family_sections().items()}}
    return _with_defaults({k: v for k, v in stored.items() if k != "sections"}, defaults)
