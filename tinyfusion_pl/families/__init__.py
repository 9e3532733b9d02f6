"""Model families: one small description per kind of diffusion transformer (see base.ModelFamily).

A new family goes here: its description (a ModelFamily subclass) in its own file, added to FAMILIES.
The diffusers families match their classes by name, so importing this package never imports diffusers.
"""

from __future__ import annotations

import torch.nn as nn

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.families.base import BlockStreams, ModelFamily
from tinyfusion_pl.families.diffusers import (
    DiffusersDiTFamily,
    DiffusersFluxFamily,
    DiffusersPixArtFamily,
    DiffusersSD3Family,
    DiTTransformerFamily,
    FluxTransformerFamily,
    PixArtTransformerFamily,
    SD3TransformerFamily,
)
from tinyfusion_pl.families.dit import DiTFamily
from tinyfusion_pl.families.mar import MARFamily
from tinyfusion_pl.families.sit import SiTFamily

# Order does not matter: the lookup walks the net's class hierarchy, most specific class first.
FAMILIES: tuple[ModelFamily, ...] = (
    DiTFamily(), SiTFamily(), MARFamily(),
    DiTTransformerFamily(), PixArtTransformerFamily(), SD3TransformerFamily(), FluxTransformerFamily(),
    DiffusersDiTFamily(), DiffusersPixArtFamily(), DiffusersSD3Family(), DiffusersFluxFamily(),
)


def find_family(net: nn.Module) -> ModelFamily | None:
    """The family that describes `net`, found by its class (a subclass of a described class is described), or None."""
    for cls in type(net).__mro__:
        for family in FAMILIES:
            if family.describes(cls):
                return family
    return None


def family_of(net: nn.Module) -> ModelFamily:
    """The family that describes `net`; raises naming the known families and how to add one."""
    family = find_family(net)
    if family is not None:
        return family
    known = ", ".join(f"{family.name} ({family.class_name})" for family in FAMILIES)
    raise UsageError(
        f"no model family describes {type(net).__name__}; known families: {known}. Describe it with a "
        "ModelFamily subclass (tinyfusion_pl/families/) and add it to tinyfusion_pl.families.FAMILIES."
    )


__all__ = ["FAMILIES", "BlockStreams", "DiTFamily", "MARFamily", "ModelFamily", "SiTFamily", "family_of", "find_family"]
