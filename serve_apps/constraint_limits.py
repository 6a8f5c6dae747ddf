"""Cheap checks that refuse constraints too costly to compile, before they reach a model.

llguidance bounds its own work (``engines.constraints`` sets its limits), but two costs
are better refused by looking at the constraint itself, at the edge, in microseconds:

- size: a schema, regex or grammar over :data:`MAX_CONSTRAINT_CHARS`;
- nested counted repetition in a regex (``(a{1000}){1000}`` asks the lexer for a million
  states; llguidance discovers that only while generating, seconds later): the product of
  the repetition bounds along any nesting path over :data:`MAX_REGEX_REPEAT`. Regexes
  inside a JSON schema (``pattern``, ``patternProperties``) are checked the same way.

Plain Python (``re``'s own parser): the wire schemas run these checks.
"""

from __future__ import annotations

import json
from typing import Any

MAX_CONSTRAINT_CHARS = 128 * 1024
MAX_REGEX_REPEAT = 10_000


def regex_repeat_cost(pattern: str) -> int:
    """The largest product of counted-repetition bounds along a nesting path of ``pattern``
    (unbounded repeats count their minimum). Raises ``re.error`` for an invalid regex."""
    import re._parser as sre_parse  # the parser `re` itself uses (Python 3.11+)
    from re._constants import MAXREPEAT

    def walk(items: Any) -> int:
        worst = 1
        for op, value in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = value
                bound = lo if hi == MAXREPEAT else hi
                worst = max(worst, max(bound, 1) * walk(sub))
            elif name == "SUBPATTERN":
                worst = max(worst, walk(value[-1]))
            elif name == "BRANCH":
                worst = max([worst, *(walk(alt) for alt in value[1])])
            elif name in ("ASSERT", "ASSERT_NOT"):
                worst = max(worst, walk(value[1]))
        return worst

    return walk(sre_parse.parse(pattern))


def check_regex(pattern: str, where: str) -> None:
    """``ValueError`` naming ``where`` when ``pattern`` is too costly (or too long)."""
    if len(pattern) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"{where} is over {MAX_CONSTRAINT_CHARS} characters")
    try:
        cost = regex_repeat_cost(pattern)
    except Exception:  # not Python's regex dialect: llguidance's compiler decides
        return
    if cost > MAX_REGEX_REPEAT:
        raise ValueError(
            f"{where} nests counted repetitions to {cost} states, over the limit of "
            f"{MAX_REGEX_REPEAT} (e.g. (a{{1000}}){{1000}}); write it with fewer nested bounds"
        )


def check_json_schema(schema: Any) -> None:
    """``ValueError`` when a JSON schema is too large or holds a too-costly pattern."""
    if len(json.dumps(schema, separators=(",", ":"))) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"json_schema is over {MAX_CONSTRAINT_CHARS} characters as JSON")
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                check_regex(pattern, "a pattern in json_schema")
            for key in node.get("patternProperties") or {}:
                if isinstance(key, str):
                    check_regex(key, "a patternProperties key in json_schema")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_grammar(grammar: str) -> None:
    if len(grammar) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"grammar is over {MAX_CONSTRAINT_CHARS} characters")
