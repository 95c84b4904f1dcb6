"""Build the tiny example shipped in examples/tiny/: a 2-layer Llama base and three LoRA adapters.

    python examples/make_tiny_example.py            # rewrites examples/tiny/

"math" is rank 4 on all seven linear modules; "code" is rank 8 (alpha 16) on q, v, up and down
only, so the example exercises different ranks and different target sets; "chat" is rank 4 (alpha 8) on
q, k, v and o, the same rank as "math", for PEFT's equal-rank factor-wise merges. Random weights, fixed
seeds: the point is the merge mechanics, not the skills.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from soupkit.testing import make_base, make_lora

HERE = Path(__file__).resolve().parent / "tiny"


def main(root: Path = HERE) -> None:
    shutil.rmtree(root, ignore_errors=True)
    base = make_base(root / "base", seed=0)
    make_lora(base, root / "adapters" / "math", seed=1, r=4, lora_alpha=8)
    make_lora(base, root / "adapters" / "code", seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    make_lora(base, root / "adapters" / "chat", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
