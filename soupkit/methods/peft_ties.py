"""PEFT's factor-wise ``ties`` combination, reproduced exactly:
peft 0.21 ``add_weighted_adapter(combination_type="ties")``.

PEFT 'ties': TIES (trim, sign, disjoint mean) on the A's and on the B's separately; cross terms.
See ``soupkit.methods._peft_factorwise`` for the formula, PEFT's quirks kept on purpose, and randomness.
"""

from __future__ import annotations

from soupkit.methods._peft_factorwise import PeftFactorwise, PeftSignParams


class PeftTies(PeftFactorwise):
    name = "peft_ties"
    paper = "PEFT LoraModel.add_weighted_adapter(combination_type='ties') (huggingface/peft 0.21)"
    summary = "PEFT 'ties': TIES (trim, sign, disjoint mean) on the A's and on the B's separately; cross terms"
    combination = "ties"
    identity_params = {"density": 1.0}
    Params = PeftSignParams
