"""The target quantizer, described once.

A :class:`QuantSpec` says how one tensor is quantized: bit-width, granularity (per output channel or per
tensor), symmetric or asymmetric grid, and which observer chooses the range. Everything in the package
(recorders, noise, the MSE term and PTQ) takes its quantizer from a ``QuantSpec``; a
:class:`~flatq_lightning.quant.targets.QuantTarget` pairs the weight and activation specs with the layers they
apply to (and reads ``"w4a4"``-style presets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

GRANULARITIES = ("per_channel", "per_tensor")
OBSERVERS = ("minmax", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 16
#: a preset side at this many bits stays float (``"w4a16"``: weights only); its spec is ``None``
FLOAT_BITS = MAX_BITS
#: the most dimensions a quantized tensor has (a Conv3d weight: out, in, kD, kH, kW)
MAX_DIMS = 5


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (uniform grid).

    Example:
        >>> w = QuantSpec.weight(4)            # symmetric, per output channel, min-max
        >>> a = QuantSpec.activation(4)        # asymmetric, per tensor, min-max
        >>> (w.qmin, w.qmax, a.qmin, a.qmax)
        (-8, 7, 0, 15)
    """

    bits: int = 8
    granularity: str = "per_tensor"
    symmetric: bool = True
    observer: str = "minmax"
    percentile: float = 99.99
    ch_axis: int = 0
    mse_grid: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"QuantSpec.bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"QuantSpec.bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec.observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile}")
        if isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int) or not -MAX_DIMS <= self.ch_axis < MAX_DIMS:
            raise ValueError(
                f"QuantSpec.ch_axis must be an int in [{-MAX_DIMS}, {MAX_DIMS - 1}] (the channel axis of a tensor of "
                f"up to {MAX_DIMS} dims, e.g. 0 for Conv/Linear weights), got {self.ch_axis!r}"
            )
        if isinstance(self.mse_grid, bool) or not isinstance(self.mse_grid, int) or self.mse_grid < 2:
            raise ValueError(f"QuantSpec.mse_grid must be an int >= 2, got {self.mse_grid!r}")

    # grid -----------------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    def with_bits(self, bits: int) -> QuantSpec:
        return replace(self, bits=bits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(**d)

    # presets --------------------------------------------------------------------------------------------
    @classmethod
    def weight(cls, bits: int, observer: str = "minmax", **kw: Any) -> QuantSpec:
        """The method's weight quantizer: symmetric, per output channel (axis 0)."""
        return cls(bits=bits, granularity="per_channel", symmetric=True, observer=observer, **kw)

    @classmethod
    def activation(cls, bits: int, observer: str = "minmax", **kw: Any) -> QuantSpec:
        """The method's activation quantizer: asymmetric, per tensor."""
        return cls(bits=bits, granularity="per_tensor", symmetric=False, observer=observer, **kw)
