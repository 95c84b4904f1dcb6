"""Calibration data for ``soupkit fit-alpha``: read examples, tokenize, batch.

Accepted inputs (one example per JSON line, or a Hugging Face dataset name where ``datasets`` is
installed), each example in one of three shapes:

- ``{"text": ...}``: the loss covers every token.
- ``{"prompt": ..., "completion": ...}``: the loss covers the completion tokens only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; the loss covers the last message (the reply being learned) only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import SoupkitError

IGNORE = -100  # label of tokens that carry no loss (prompt, padding): torch's cross_entropy default


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` of equal length (labels IGNORE where no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_target(self) -> int:
        """Number of tokens that carry loss (the first token never does: nothing predicts it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def read_records(source: str, where: str) -> list[dict]:
    """Read raw records from a .jsonl file, or from a Hugging Face dataset ``name[:split]``."""
    path = Path(source).expanduser()
    if not path.is_file() and looks_like_path(source):
        check_data_path(path, where)
    if path.is_file():
        records = []
        for i, line in enumerate(read_utf8(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SoupkitError(
                    f"{path}:{i}", "one JSON object per line", f"invalid JSON ({err.msg})", "fix that line"
                ) from None
            if not isinstance(record, dict):
                raise SoupkitError(f"{path}:{i}", "a JSON object", type(record).__name__, "write one object per line")
            records.append(record)
        return records
    return _hub_records(source, where)


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is a one-line error naming its line."""
    data = path.read_bytes()
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SoupkitError(
            f"{path}:{line}",
            "UTF-8 text",
            f"the byte {data[err.start : err.start + 1]!r}, which is not UTF-8",
            "save the file as UTF-8",
        ) from None


def same_source(data: str, eval_data: str) -> bool:
    """Whether --eval-data names the same file (or dataset) as --data."""
    a, b = Path(data).expanduser(), Path(eval_data).expanduser()
    if a.is_file() and b.is_file():
        return a.samefile(b)
    return data == eval_data


def looks_like_path(source: str) -> bool:
    """A local file name rather than a dataset id: a JSON suffix, or starting with '.', '/' or '~'."""
    return Path(source).suffix.lower() in (".jsonl", ".json", ".jsonlines", ".txt") or source.startswith((".", "/", "~"))


def check_data_path(path: Path, where: str) -> None:
    """Refuse a missing data file at once, naming a close sibling file if there is one."""
    from soupkit.errors import did_you_mean

    if path.is_dir():
        raise SoupkitError(where, "a .jsonl file", f"a directory ({path})", "point at the file inside it")
    parent = path.parent if path.parent.is_dir() else None
    siblings = [p.name for p in islice(parent.iterdir(), 2000)] if parent else []  # a huge folder is not scanned whole
    hint = did_you_mean(path.name, siblings)
    raise SoupkitError(where, "an existing .jsonl file", f"no such file '{str(path)[:80]}'{hint}", "check the path")


def _hub_records(name: str, where: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise SoupkitError(
            where,
            "an existing .jsonl file",
            f"'{name}' (no such file; `datasets` is not installed)",
            'check the path, or pip install "soupkit[hub-data]" to load a Hugging Face dataset by name',
        ) from None
    dataset, _, split = name.partition(":")
    try:
        return [dict(r) for r in datasets.load_dataset(dataset, split=split or "train")]
    except Exception as err:  # noqa: BLE001 -- datasets raises many types; the user only needs to know it failed and why
        raise SoupkitError(
            where, "a .jsonl file or a loadable dataset", f"'{name}' ({type(err).__name__}: {err})", "check the name"
        ) from None


def check_record_shapes(records: list[dict], where: str) -> None:
    """Refuse a record of none of the three shapes (before any tokenizer or model is loaded)."""
    for i, record in enumerate(records):
        if not ("messages" in record or ("prompt" in record and "completion" in record) or "text" in record):
            keys = ", ".join(sorted(record))[:80]
            raise SoupkitError(
                f"{where} record {i}",
                "a 'text', 'prompt'+'completion' or 'messages' field",
                f"keys [{keys}]",
                "use one of these formats",
            )
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
                raise SoupkitError(
                    f"{where} record {i}",
                    "'messages' as a non-empty list of {role, content} (strings)",
                    repr(messages)[:60],
                    "fix the record",
                )
            continue
        fields = ("prompt", "completion") if "prompt" in record and "completion" in record else ("text",)
        for name in fields:
            if not isinstance(record[name], str):
                raise SoupkitError(
                    f"{where} record {i}",
                    f"'{name}' as a string",
                    f"{type(record[name]).__name__} {repr(record[name])[:40]}",
                    "quote the value, or fix the record",
                )


def _is_message(message: object) -> bool:
    """One chat message: a mapping with string 'role' and 'content'."""
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def tokenize_record(record: dict, tokenizer: Any, seq_len: int, where: str) -> Example:
    """Tokenize one record (text | prompt+completion | messages), truncated to ``seq_len`` tokens."""
    if "messages" in record:
        prompt_ids, full_ids = _chat_ids(record["messages"], tokenizer, where)
        n_prompt = len(prompt_ids)
    elif "prompt" in record and "completion" in record:
        prompt_ids = tokenizer(str(record["prompt"]))["input_ids"]
        full_ids = prompt_ids + tokenizer(str(record["completion"]), add_special_tokens=False)["input_ids"]
        n_prompt = len(prompt_ids)
    elif "text" in record:
        full_ids, n_prompt = tokenizer(str(record["text"]))["input_ids"], 0
    else:
        raise SoupkitError(
            where, "a 'text', 'prompt'+'completion' or 'messages' field", f"keys {sorted(record)}", "use one of these formats"
        )
    ids = list(full_ids)[:seq_len]
    labels = [IGNORE if i < n_prompt else t for i, t in enumerate(ids)]
    return Example(ids, labels)


def _chat_ids(messages: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise SoupkitError(where, "'messages' as a non-empty list of {role, content}", repr(messages)[:60], "fix the record")
    if not getattr(tokenizer, "chat_template", None):
        raise SoupkitError(
            where, "a tokenizer with a chat template", "none in the base model", "use 'text' or 'prompt'+'completion' records"
        )
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    if list(full[: len(prompt)]) != list(prompt):  # the template re-renders earlier turns: cannot split safely
        raise SoupkitError(
            where,
            "a chat template whose prompt is a prefix of the full chat",
            "a template that is not",
            "use 'prompt'+'completion' records",
        )
    return list(prompt), list(full)


def load_examples(source: str, tokenizer: Any, seq_len: int, where: str, records: list[dict] | None = None) -> list[Example]:
    """Read (unless ``records`` were read already) and tokenize every record; refuse a source with no example that carries loss."""
    records = read_records(source, where) if records is None else records
    examples = [tokenize_record(r, tokenizer, seq_len, f"{where} record {i}") for i, r in enumerate(records)]
    examples = [e for e in examples if e.n_target > 0]
    if not examples:
        raise SoupkitError(where, "at least one example with loss tokens", "none", f"check {source} (too short for --seq-len?)")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask and labels, each (batch, length)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split into (train, held-out); held-out gets at least one example, train keeps one."""
    if len(examples) < 2:
        raise SoupkitError(
            "--data", "at least 2 examples (or --eval-data)", f"{len(examples)}", "add examples or pass --eval-data"
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
