"""The SiT family (willisma/SiT): DiT's structure and conditioning; only the model class (float times) differs."""

from __future__ import annotations

from tinyfusion_pl.families.dit import DiTFamily
from tinyfusion_pl.models.sit import SiT


class SiTFamily(DiTFamily):
    name = "sit"
    model_class = SiT
