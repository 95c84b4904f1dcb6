"""PEFT's factor-wise ``dare_linear`` combination, reproduced exactly:
peft 0.21 ``add_weighted_adapter(combination_type="dare_linear")``.

PEFT 'dare_linear': Bernoulli(density) drop + 1/density rescale on A's and B's separately, sum.
See ``soupkit.methods._peft_factorwise`` for the formula, PEFT's quirks kept on purpose, and randomness.
"""

from __future__ import annotations

from soupkit.methods._peft_factorwise import PeftFactorwise, PeftParams


class PeftDareLinear(PeftFactorwise):
    name = "peft_dare_linear"
    paper = "PEFT LoraModel.add_weighted_adapter(combination_type='dare_linear') (huggingface/peft 0.21)"
    summary = "PEFT 'dare_linear': Bernoulli(density) drop + 1/density rescale on A's and B's separately, sum"
    combination = "dare_linear"
    identity_params = {"density": 1.0}
    order_invariant = False  # draws follow adapter position, as PEFT's global-RNG calls do
    Params = PeftParams
