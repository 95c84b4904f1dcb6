"""PEFT's factor-wise ``linear`` combination, reproduced exactly:
peft 0.21 ``add_weighted_adapter(combination_type="linear")``.

A = sum sgn(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i (c_i = w_i s_i); cross terms; PEFT 'linear'.
See ``soupkit.methods._peft_factorwise`` for the formula, PEFT's quirks kept on purpose, and randomness.
"""

from __future__ import annotations

from soupkit.methods._peft_factorwise import PeftFactorwise
from soupkit.methods.base import NoParams


class PeftLinear(PeftFactorwise):
    name = "peft_linear"
    paper = "PEFT LoraModel.add_weighted_adapter(combination_type='linear') (huggingface/peft 0.21)"
    summary = "A = sum sgn(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i (c_i = w_i s_i); cross terms; PEFT 'linear'"
    combination = "linear"
    Params = NoParams
