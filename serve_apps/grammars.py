"""Grammar dialects a ``constraints.grammar`` may be written in, made ready for llguidance.

- **Lark** (llguidance's dialect, ``rule: "literal" other``): passed through.
- **GBNF** (llama.cpp, ``rule ::= "literal" other``, a ``root`` rule): llguidance converts it.
- **EBNF with single-quoted literals** (``function ::= 'fn' name '(' params ')' block``, as
  Ananke's clients write it): converted here to GBNF: literals double-quoted, and a
  ``root`` rule added for the first rule when none is named ``root``.

For both ``::=`` forms every rule used must be defined: an incomplete grammar is refused
with the names of its undefined rules (llguidance's own message would name only one).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<squote>'(?:[^'\\]|\\.)*')
  | (?P<dquote>"(?:[^"\\]|\\.)*")
  | (?P<cls>\[(?:[^\]\\]|\\.)*\])
  | (?P<defn>::=)
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>[|()*+?.]|\{[0-9]*(?:,[0-9]*)?\})
    """,
    re.VERBOSE,
)


class GrammarSyntaxError(ValueError):
    """A ``::=`` grammar that cannot be read or is incomplete (the message says why)."""


def is_bnf(grammar: str) -> bool:
    """Whether the grammar is written with ``::=`` rules (GBNF or EBNF), not Lark."""
    return re.search(r"^\s*[A-Za-z_][A-Za-z0-9_-]*\s*::=", grammar, re.MULTILINE) is not None


def _tokens(grammar: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(grammar):
        m = _TOKEN.match(grammar, pos)
        if m is None:
            snippet = grammar[pos : pos + 20]
            raise GrammarSyntaxError(f"cannot read the grammar at {snippet!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind not in ("ws", "comment"):
            tokens.append((kind, m.group()))
        pos = m.end()
    return tokens


def _double_quoted(literal: str) -> str:
    """A single-quoted literal as a GBNF (double-quoted) one, escapes kept."""
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append("'" if nxt == "'" else c + nxt)
            i += 2
            continue
        out.append('\\"' if c == '"' else c)
        i += 1
    return '"' + "".join(out) + '"'


def bnf_to_gbnf(grammar: str) -> str:
    """GBNF text for a ``::=`` grammar; ``GrammarSyntaxError`` naming undefined rules."""
    tokens = _tokens(grammar)
    defined: list[str] = []
    used: list[str] = []
    rules: list[list[str]] = []
    for i, (kind, text) in enumerate(tokens):
        starts_rule = kind == "name" and i + 1 < len(tokens) and tokens[i + 1][0] == "defn"
        if starts_rule:
            defined.append(text)
            rules.append([text])
            continue
        if not rules:
            raise GrammarSyntaxError(
                f"the grammar must begin with a rule ('name ::= ...'), not {text!r}"
            )
        if kind == "name":
            used.append(text)
        piece = _double_quoted(text) if kind == "squote" else text
        postfix = kind == "op" and (text in ("*", "+", "?") or text.startswith("{"))
        if postfix and len(rules[-1]) > 2:
            rules[-1][-1] += piece  # a postfix operator stays on its term: [a-z]+, "b"{1,3}
        else:
            rules[-1].append(piece)
    missing = sorted(set(used) - set(defined), key=used.index)
    if missing:
        raise GrammarSyntaxError("the grammar uses rules it does not define: " + ", ".join(missing))
    twice = sorted({n for n in defined if defined.count(n) > 1})
    if twice:
        raise GrammarSyntaxError("rules defined more than once: " + ", ".join(twice))
    lines = [" ".join(rule) for rule in rules]
    if "root" not in defined:
        lines.insert(0, f"root ::= {defined[0]}")
    return "\n".join(lines) + "\n"


def normalize(grammar: str) -> str:
    """The grammar as llguidance's ``grammar`` input takes it (Lark, or GBNF)."""
    return bnf_to_gbnf(grammar) if is_bnf(grammar) else grammar
