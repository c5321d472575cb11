"""Prompts for the explainer and the detection judge, and robust parsing of their answers.

Detection answers are parsed, in this order (the first rule that applies wins):

1. a bracketed list, e.g. ``[1, 3]`` (snippet numbers, 1-based) or ``[1, 0, 0, 1]`` (one 0/1
   per snippet: a list of exactly ``n`` zeros and ones that has a 0 or a repeat);
   ``[]`` means none;
2. one line per snippet with yes/no (``"1: yes"``, ``"Snippet 2 - no"``), covering all ``n``;
3. bare numbers, ``"1, 3 and 4"``, or ``"none"``.

A constrained (JSON) answer ``{"matches": [1, 3]}`` is read by rule 1; an explanation answer
``{"explanation": "..."}`` by its key. Numbers outside 1..n make an answer unparsable. An
unparsable answer is retried once with a correction message appended (a different request, so
the cache keeps both); if that fails too the batch is recorded as unparsable and left out of the
accuracies (and counted).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import cast

Messages = list[dict[str, str]]

EXPLAIN_SYSTEM = (
    "You study one latent (a learned feature) of a language model. You are shown text snippets "
    "in which the tokens where the latent activates are marked with << and >>, strongest first. "
    "In one short sentence, say what the marked tokens and their contexts have in common. "
    "Reply in the form: Explanation: <sentence>"
)
DETECT_SYSTEM = (
    "You are testing an explanation of a latent (a learned feature) of a language model. Given "
    "the explanation and numbered text snippets, decide which snippets contain text that the "
    "latent activates on. Answer with a JSON list of the numbers of the matching snippets, "
    "e.g. [1, 3]; answer [] if none match. Output only the list."
)
EXPLAIN_QUESTION = (
    "What do the marked tokens and their contexts have in common? Reply in one sentence."
)
DETECT_QUESTION = (
    "Which snippets match the explanation? Answer with a JSON list of snippet numbers only, e.g. "
    "[1, 3], or [] if none."
)
EXPLAIN_RETRY = "Reply with one sentence only, in the form: Explanation: <sentence>"
DETECT_RETRY = "Reply with only a JSON list of the matching snippet numbers, e.g. [1, 3], or []."


EXPLAIN_SCHEMA = {"type": "object", "properties": {"explanation": {"type": "string"}},
                  "required": ["explanation"]}
DETECT_SCHEMA = {
    "type": "object",
    "properties": {"matches": {"type": "array", "items": {"type": "integer", "minimum": 1}}},
    "required": ["matches"],
}


def response_format(kind: str, schema: dict, name: str) -> dict | None:
    """The chat API's ``response_format`` that constrains answers to ``schema`` (None:
    ``"text"``)."""
    if kind == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        }
    if kind == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


def explanation_messages(examples: Sequence[str]) -> Messages:
    """The explainer's request: highlighted example windows, numbered, then the question (small
    models follow an instruction better when it comes last)."""
    body = "\n".join(f"Example {i}: {text}" for i, text in enumerate(examples, 1))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"{body}\n\n{EXPLAIN_QUESTION}"}]


def detection_messages(explanation: str, snippets: Sequence[str]) -> Messages:
    """The judge's request: the explanation and plain (unhighlighted) numbered snippets."""
    body = "\n".join(f"{i}. {text}" for i, text in enumerate(snippets, 1))
    user = f"Explanation: {explanation}\n\nSnippets:\n{body}\n\n{DETECT_QUESTION}"
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


def retry_messages(messages: Messages, answer: str, correction: str) -> Messages:
    """``messages`` followed by the unusable answer and a request to use the required form."""
    return [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": correction},
    ]


def parse_explanation(text: str | None, *, max_chars: int = 300) -> str | None:
    """The explanation sentence: text after the last ``Explanation:``, first non-empty line.

    None when nothing usable is left (empty or fewer than 3 characters).
    """
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("explanation"), str):
        text = cast(str, data["explanation"])
    parts = re.split(r"explanation\s*:", text, flags=re.IGNORECASE)
    tail = parts[-1] if len(parts) > 1 else text
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    line = line.strip(" \t\"'`*").strip()
    return line[:max_chars] if len(line) >= 3 else None


_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_YES_NO = re.compile(
    r"^\W*(?:snippet|example|#)?\s*(\d+)\s*[\W_]*\s*(yes|no|true|false)\b", re.IGNORECASE
)
_NUMBERS = re.compile(r"^(?:snippets?|examples?)?\s*:?\s*(\d+(?:\s*(?:,|;|&|and)\s*\d+)*)\s*\.?$",
                      re.IGNORECASE)
_NONE = re.compile(r"^(?:none|no snippets?|no matches|nothing)\b", re.IGNORECASE)


def _from_indices(values: Sequence[int], n: int) -> list[bool] | None:
    if any(v < 1 or v > n for v in values):
        return None
    chosen = set(values)
    return [i in chosen for i in range(1, n + 1)]


def _from_list(values: list[object], n: int) -> list[bool] | None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    ints = [int(v) for v in values]  # type: ignore[call-overload]
    binary = len(ints) == n and set(ints) <= {0, 1} and (0 in ints or len(set(ints)) < n)
    if binary:
        return [v == 1 for v in ints]
    return _from_indices(ints, n)


def parse_detection(text: str | None, n: int) -> list[bool] | None:
    """Which of ``n`` snippets the judge says activate (see the module docstring), or None."""
    if not text:
        return None
    for match in _BRACKETS.finditer(text):
        try:
            values = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        parsed = _from_list(values, n)
        if parsed is not None:
            return parsed
    said: dict[int, bool] = {}
    for line in text.splitlines():
        m = _YES_NO.match(line.strip())
        if m:
            said[int(m.group(1))] = m.group(2).lower() in ("yes", "true")
    if set(said) == set(range(1, n + 1)):
        return [said[i] for i in range(1, n + 1)]
    stripped = text.strip()
    if _NONE.match(stripped):
        return [False] * n
    m = _NUMBERS.match(stripped)
    if m:
        return _from_indices([int(v) for v in re.findall(r"\d+", m.group(1))], n)
    return None
