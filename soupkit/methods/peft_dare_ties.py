"""PEFT's factor-wise ``dare_ties`` combination, reproduced exactly:
peft 0.21 ``add_weighted_adapter(combination_type="dare_ties")``.

PEFT 'dare_ties': DARE drop-rescale then TIES election on A's and B's separately.
See ``soupkit.methods._peft_factorwise`` for the formula, PEFT's quirks kept on purpose, and randomness.
"""

from __future__ import annotations

from soupkit.methods._peft_factorwise import PeftFactorwise, PeftSignParams


class PeftDareTies(PeftFactorwise):
    name = "peft_dare_ties"
    paper = "PEFT LoraModel.add_weighted_adapter(combination_type='dare_ties') (huggingface/peft 0.21)"
    summary = "PEFT 'dare_ties': DARE drop-rescale then TIES election on A's and B's separately"
    combination = "dare_ties"
    identity_params = {"density": 1.0}
    order_invariant = False  # draws follow adapter position, as PEFT's global-RNG calls do
    Params = PeftSignParams
