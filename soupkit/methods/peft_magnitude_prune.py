"""PEFT's factor-wise ``magnitude_prune`` combination, reproduced exactly:
peft 0.21 ``add_weighted_adapter(combination_type="magnitude_prune")``.

PEFT 'magnitude_prune': top-density |.| of each A_i and B_i, weighted sums.
See ``soupkit.methods._peft_factorwise`` for the formula, PEFT's quirks kept on purpose, and randomness.
"""

from __future__ import annotations

from soupkit.methods._peft_factorwise import PeftFactorwise, PeftParams


class PeftMagnitudePrune(PeftFactorwise):
    name = "peft_magnitude_prune"
    paper = "PEFT LoraModel.add_weighted_adapter(combination_type='magnitude_prune') (huggingface/peft 0.21)"
    summary = "PEFT 'magnitude_prune': top-density |.| of each A_i and B_i, weighted sums"
    combination = "magnitude_prune"
    identity_params = {"density": 1.0}
    Params = PeftParams
