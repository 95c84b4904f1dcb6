"""Evaluation data: fit-alpha's record formats plus an optional reference answer.

Each JSON line is ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages": [...]}``, with an optional
``"reference"``. For generation metrics the prompt is ``prompt`` (or ``messages`` without a final
assistant turn, rendered with the chat template and its generation prompt), and the reference is
``reference``, else ``completion``, else that final assistant turn's content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.fit.data import check_record_shapes, read_records


@dataclass(frozen=True)
class EvalRecord:
    """One example: the raw record (for loss), the prompt text and reference (for generation)."""

    record: dict
    prompt: str | None
    reference: str | None


def read_eval_records(source: str, where: str) -> list[dict]:
    """Read and shape-check records; refuse an empty data set (nothing to score)."""
    records = read_records(source, where)
    if not records:
        raise SoupkitError(where, "at least one record", f"an empty data set ({source})", "add examples to the file")
    for i, record in enumerate(records):
        if not any(k in record for k in ("text", "prompt", "messages")):
            keys = ", ".join(sorted(record))[:80]
            raise SoupkitError(
                f"{where} record {i}", "a 'text', 'prompt' or 'messages' field", f"keys [{keys}]", "use one of these formats"
            )
        ref = record.get("reference")
        if ref is not None and not isinstance(ref, str | int | float):
            raise SoupkitError(f"{where} record {i}", "'reference' as a string", type(ref).__name__, "fix the record")
    return records


def check_metric_fields(records: list[dict], where: str, kind: str) -> None:
    """What the metric needs, checked before any model loads: loss needs a scored part, generation a prompt."""
    if kind == "loss":
        check_record_shapes(records, where)
    elif kind == "generate":
        check_prompts(records, where)


def check_prompts(records: list[dict], where: str) -> None:
    """Generation metrics need a prompt in every record."""
    for i, record in enumerate(records):
        if "prompt" not in record and "messages" not in record:
            raise SoupkitError(
                f"{where} record {i}",
                "a 'prompt' or 'messages' field for a generation metric",
                "only 'text'",
                "use prompt/reference records, or --metric loss",
            )


def _chat_prompt(messages: list[dict], tokenizer: Any, where: str) -> tuple[str, str | None]:
    if not getattr(tokenizer, "chat_template", None):
        raise SoupkitError(
            where, "a tokenizer with a chat template", "none in the base model", "use 'prompt' records for generation"
        )
    turns, answer = messages, None
    if messages[-1].get("role") == "assistant":
        turns, answer = messages[:-1], str(messages[-1].get("content", ""))
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return str(text), answer


def eval_records(records: list[dict], tokenizer: Any, where: str, need_prompt: bool) -> list[EvalRecord]:
    """Attach prompt and reference to each record (``need_prompt``: generation metrics need a prompt)."""
    out = []
    for i, record in enumerate(records):
        prompt, answer = None, None
        if "messages" in record:
            prompt, answer = _chat_prompt(record["messages"], tokenizer, f"{where} record {i}")
        elif "prompt" in record:
            prompt, answer = str(record["prompt"]), record.get("completion")
        elif need_prompt:
            raise SoupkitError(
                f"{where} record {i}",
                "a 'prompt' or 'messages' field for a generation metric",
                "only 'text'",
                "use prompt/reference records, or --metric loss",
            )
        reference = record.get("reference", answer)
        out.append(EvalRecord(record, prompt, None if reference is None else str(reference)))
    return out


def record_key(record: dict) -> str:
    """A canonical text of a record: two files overlap when they share one."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def check_disjoint_data(validation: str, test: str, where: str) -> None:
    """Selection must never see the test data: refuse the same file, or any shared record."""
    v, t = Path(validation).expanduser(), Path(test).expanduser()
    if v.exists() and t.exists() and v.resolve() == t.resolve():
        raise SoupkitError(where, "different validation and test files", f"the same file twice ({validation})", "split your data")
    shared = {record_key(r) for r in read_records(validation, f"{where}.validation")}
    overlap = [r for r in read_records(test, f"{where}.test") if record_key(r) in shared]
    if overlap:
        raise SoupkitError(
            where,
            "validation and test data with no record in common",
            f"{len(overlap)} shared record(s), e.g. {record_key(overlap[0])[:60]}",
            "remove the shared records from one of the files",
        )
