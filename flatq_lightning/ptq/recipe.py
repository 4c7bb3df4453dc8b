"""PTQ recipes: how the quantized copies are made, as one value.

A :class:`PTQRecipe` holds the weight and activation observers, BatchNorm re-estimation and block
reconstruction. The same value goes to :func:`~flatq_lightning.ptq.runner.run_ptq`,
``PostTrainingQuantization(recipe=...)``, ``flatq-ptq --recipe NAME`` and Hydra's ``ptq/recipe`` group, and the
report says which recipe made its rows.

Presets (:data:`RECIPES`):

- ``"minmax"``: per-channel min-max weights, min-max activation ranges, BN folded as trained;
- ``"practical"``: MSE-optimal weight clipping, percentile activation ranges, BN re-estimated on the quantized
  network before folding (what a practitioner does before anything heavier);
- ``"reconstruct"``: ``practical`` followed by block reconstruction (learned rounding, learned activation step
  sizes, QDrop; :class:`~flatq_lightning.quant.reconstruct.Reconstruction`).

Example:
    >>> r = PTQRecipe.preset("reconstruct", iters=200, drop_prob=0.0)
    >>> r.name, r.observer, r.act_observer, r.bn_reestimate, r.reconstruction.iters
    ('reconstruct', 'mse', 'percentile', True, 200)
    >>> PTQRecipe.from_dict(r.to_dict()) == r
    True
    >>> resolve_recipe("practical").reconstruction is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..quant.placement import check_placement
from ..quant.reconstruct import Reconstruction
from ..quant.spec import OBSERVERS

__all__ = ["RECIPES", "PTQRecipe", "recipe_names", "resolve_recipe"]

_RECON_FIELDS = tuple(f.name for f in fields(Reconstruction))


@dataclass(frozen=True)
class PTQRecipe:
    """How PTQ makes each quantized copy (see the module docstring). Frozen: change it with :meth:`replace`."""

    #: the preset it came from (or a name of your own); reports and loggers show it
    name: str = "minmax"
    #: weight range observer: ``"minmax"``, ``"percentile"`` or ``"mse"`` (MSE-optimal clipping per channel)
    observer: str = "minmax"
    #: activation range observer (``None``: the weight observer)
    act_observer: str | None = None
    #: re-estimate BatchNorm statistics on the quantized network (per bit-width) before folding
    bn_reestimate: bool = False
    #: batches the BN re-estimation averages over
    bn_batches: int = 32
    #: block reconstruction after calibration, or ``None``
    reconstruction: Reconstruction | None = None
    #: where the activation quantizers go (:mod:`~flatq_lightning.quant.placement`): ``"layer_inputs"`` or
    #: ``"onnxruntime"`` (also residual adds and pooling inputs, so ONNX Runtime runs integer kernels)
    placement: str = "layer_inputs"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PTQRecipe.name must be a non-empty string, got {self.name!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"PTQRecipe.observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.act_observer is not None and self.act_observer not in OBSERVERS:
            raise ValueError(f"PTQRecipe.act_observer must be one of {OBSERVERS} or None, got {self.act_observer!r}")
        if not isinstance(self.bn_reestimate, bool):
            raise ValueError(f"PTQRecipe.bn_reestimate must be True or False, got {self.bn_reestimate!r}")
        if isinstance(self.bn_batches, bool) or not isinstance(self.bn_batches, int) or self.bn_batches < 1:
            raise ValueError(f"PTQRecipe.bn_batches must be a positive int, got {self.bn_batches!r}")
        check_placement(self.placement, "PTQRecipe.placement")
        rec = self.reconstruction
        if isinstance(rec, Mapping):
            object.__setattr__(self, "reconstruction", Reconstruction.from_dict(dict(rec)))
        elif rec is not None and not isinstance(rec, Reconstruction):
            raise ValueError(f"PTQRecipe.reconstruction must be None or a Reconstruction, got {rec!r}")

    @property
    def act_obs(self) -> str:
        """The activation observer in force (``act_observer``, else ``observer``)."""
        return self.act_observer or self.observer

    @classmethod
    def preset(cls, name: str, /, **overrides: Any) -> PTQRecipe:
        """A preset of :data:`RECIPES` with ``overrides`` (see :meth:`replace`; ``name=`` renames it)."""
        if name not in RECIPES:
            raise ValueError(f"unknown PTQ recipe {name!r}; the presets are {list(RECIPES)}")
        return RECIPES[name].replace(**overrides) if overrides else RECIPES[name]

    def replace(self, **overrides: Any) -> PTQRecipe:
        """A copy with fields replaced. Reconstruction settings may be given flat (``iters=500``,
        ``drop_prob=0``); they turn reconstruction on with the defaults for the rest. ``reconstruction=None``
        turns it off."""
        own = {f.name for f in fields(self)}
        flat = {k: v for k, v in overrides.items() if k not in own}
        unknown = sorted(k for k in flat if k not in _RECON_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown PTQ recipe setting(s) {unknown}; the recipe has {sorted(own)} and the reconstruction "
                f"settings {list(_RECON_FIELDS)}"
            )
        top = {k: v for k, v in overrides.items() if k in own}
        new = replace(self, **top)
        if flat:
            if "reconstruction" in top and top["reconstruction"] is None:
                raise ValueError(f"reconstruction=None contradicts the reconstruction settings {sorted(flat)}")
            base = new.reconstruction or Reconstruction()
            new = replace(new, reconstruction=replace(base, **flat))
        return new

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "observer": self.observer, "act_observer": self.act_observer,
            "bn_reestimate": self.bn_reestimate, "bn_batches": self.bn_batches,
            "reconstruction": self.reconstruction.to_dict() if self.reconstruction else None,
            "placement": self.placement,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PTQRecipe:
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PTQ recipe field(s) {unknown}; the fields are {sorted(known)}")
        return cls(**d)

    def settings(self) -> dict[str, Any]:
        """The recipe as flat logger hyperparameters (the keys of ``PTQReport.settings``): ``ptq/recipe`` (its
        name), ``ptq/reconstruction/<field>`` (when it reconstructs), ``ptq/observer``, ``ptq/act_observer`` (the one
        in force), ``ptq/bn_reestimate`` and ``ptq/bn_batches`` (0 without re-estimation).

        Example:
            >>> s = PTQRecipe.preset("reconstruct", iters=200).settings()
            >>> s["ptq/recipe"], s["ptq/act_observer"], s["ptq/reconstruction/iters"], s["ptq/reconstruction/beta"]
            ('reconstruct', 'percentile', 200, '20.0,2.0')
        """
        rec = self.reconstruction.to_dict() if self.reconstruction else {}
        return {
            "ptq/recipe": self.name,
            **{f"ptq/reconstruction/{k}": (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
               for k, v in rec.items() if v is not None},
            "ptq/observer": self.observer,
            "ptq/act_observer": self.act_obs,
            "ptq/bn_reestimate": self.bn_reestimate,
            "ptq/bn_batches": self.bn_batches if self.bn_reestimate else 0,
            "ptq/placement": self.placement,
        }

    def describe(self) -> str:
        """One line for reports and logs."""
        bn = "BN re-estimated" if self.bn_reestimate else "BN as trained"
        s = f"{self.name}: weights {self.observer}, activations {self.act_obs}, {bn}"
        if self.placement != "layer_inputs":
            s += f", quantizers placed for {self.placement}"
        r = self.reconstruction
        if r is not None:
            s += (f", block reconstruction ({r.iters} steps/block, batch {r.batch_size}, {r.calib_images} images, "
                  f"drop_prob {r.drop_prob:g}, seed {r.seed})")
        return s


#: the named presets
RECIPES: dict[str, PTQRecipe] = {
    "minmax": PTQRecipe("minmax"),
    "practical": PTQRecipe("practical", observer="mse", act_observer="percentile", bn_reestimate=True),
    "reconstruct": PTQRecipe("reconstruct", observer="mse", act_observer="percentile", bn_reestimate=True,
                             reconstruction=Reconstruction()),
}


def recipe_names() -> list[str]:
    return list(RECIPES)


def resolve_recipe(recipe: PTQRecipe | str | Mapping[str, Any] | None, **overrides: Any) -> PTQRecipe:
    """A :class:`PTQRecipe` from a recipe, a preset name, a mapping (``{"name": "reconstruct", "iters": 500}``:
    the preset of that name, else ``minmax``, with the other keys as overrides) or ``None`` (``minmax``)."""
    if recipe is None:
        base = RECIPES["minmax"]
    elif isinstance(recipe, PTQRecipe):
        base = recipe
    elif isinstance(recipe, str):
        base = PTQRecipe.preset(recipe)
    elif isinstance(recipe, Mapping):
        d = dict(recipe)
        name = d.pop("name", "minmax")
        rec = d.pop("reconstruction", "unset")
        if name not in RECIPES and not d and rec == "unset":  # a bare unknown name is a typo, not a recipe
            raise ValueError(f"unknown PTQ recipe {name!r}; the presets are {list(RECIPES)} (a recipe of your own "
                             "names its fields too, e.g. {'name': 'mine', 'observer': 'mse'})")
        base = RECIPES[name] if name in RECIPES else replace(RECIPES["minmax"], name=name)
        if rec != "unset":
            d["reconstruction"] = Reconstruction.from_dict(dict(rec)) if isinstance(rec, Mapping) else rec
        base = base.replace(**d) if d else base
    else:
        raise ValueError(
            f"recipe must be a PTQRecipe, one of {list(RECIPES)}, or a mapping of its fields, got {recipe!r}"
        )
    return base.replace(**overrides) if overrides else base
