"""Build the tiny example shipped in examples/tiny/: a 2-layer Llama base and three LoRA adapters.

    python examples/make_tiny_example.py            # rewrites examples/tiny/

"math" is rank 4 on all seven linear modules; "code" is rank 8 (alpha 16) on q, v, up and down
only, so the example exercises different ranks and different target sets; "chat" is rank 4 (alpha 8) on
q, k, v and o, the same rank as "math", for PEFT's equal-rank factor-wise merges. Random weights, fixed
seeds: the point is the merge mechanics, not the skills. ``calib.jsonl`` is 32 lines of text sampled
from the base with the "math" adapter active, the calibration set of the README's ``fit-alpha`` command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from soupkit.testing import make_base, make_lora

HERE = Path(__file__).resolve().parent / "tiny"


def main(root: Path = HERE) -> None:
    shutil.rmtree(root, ignore_errors=True)
    base = make_base(root / "base", seed=0)
    make_lora(base, root / "adapters" / "math", seed=1, r=4, lora_alpha=8)
    make_lora(
        base, root / "adapters" / "code", seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]
    )
    make_lora(
        base, root / "adapters" / "chat", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    write_calibration(root, root / "calib.jsonl")
    print(f"wrote {root}")


def write_calibration(root: Path, path: Path, examples: int = 32, chars: int = 48, seed: int = 0) -> None:
    """JSON lines ``{"text": ...}`` sampled from base + math adapter (printable characters only)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, root / "adapters" / "math").eval()
    torch.manual_seed(seed)
    start = torch.full((examples, 1), tokenizer.bos_token_id)
    with torch.no_grad():  # ids 0-3 are the special tokens: suppressed so every line is plain text
        ids = model.generate(
            start, do_sample=True, top_k=0, max_new_tokens=chars, min_new_tokens=chars, suppress_tokens=[0, 1, 2, 3]
        )
    texts = tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


if __name__ == "__main__":
    main()
