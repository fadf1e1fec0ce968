"""The referring-expression language of the synthetic scenes: a fixed vocabulary, a tiny grammar, a generator and
an independent resolver that checks every generated expression picks out exactly one object.

Grammar (every expression starts with ``the``; ``NP`` = ``[size] [colour] head``, head = a kind or ``shape``,
at least one of size / colour / kind present)::

    the NP                                    "the red circle", "the large blue square", "the triangle"
    the SUPERLATIVE NP                        "the leftmost triangle"  (leftmost|rightmost|topmost|bottommost)
    the COMPARATIVE NP                        "the larger square"      (larger|smaller; NP without a size word,
                                                                        exactly two objects match NP)
    the NP RELATION the NP                    "the green shape left of the yellow circle"
                                                                       (left of|right of|above|below)

Semantics (what a tiny model must learn, all decided on tight pixel boxes):
- attributes match exactly; ``shape`` matches any kind.
- positions compare box centres. ``m`` = ``margin`` pixels (default 4 % of the shorter image side): X is
  *certainly* left of Y when ``cx(X) + m <= cx(Y)``, *certainly not* when ``cx(X) >= cx(Y) + m``, undecided in
  between (the same for right / above / below with the matching axis; image y grows downwards). "the leftmost NP"
  is certain for X when every other NP object is at least ``m`` further right, impossible when some other NP object
  is at least ``m`` further left.
- "the larger / smaller NP": exactly two objects match NP and their size classes differ.
- "the NP REL the NP2": NP2 must pick out exactly one object (the anchor) by attributes alone; the referent is
  among the NP objects other than the anchor.

An expression is accepted only when the set of objects it *certainly* denotes and the set it *possibly* denotes
are both exactly ``{target}`` (:func:`resolve`), so undecided geometry never yields an ambiguous expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

COLOURS: dict[str, tuple[int, int, int]] = {
    # No red: the env draws the model's previous box as a red overlay, and a red shape under it would be confusable.
    "blue": (40, 100, 255),
    "green": (40, 200, 60),
    "yellow": (250, 220, 30),
    "white": (235, 235, 235),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SUPERLATIVES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
COMPARATIVES: tuple[str, ...] = ("larger", "smaller")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
EXPRESSION_TYPES: tuple[str, ...] = ("attribute", "superlative", "comparative", "relation")

#: Every word an expression can contain (sorted; a tokenizer trained on this list covers all expressions).
VOCABULARY: list[str] = sorted(
    {"the", "shape", *COLOURS, *KINDS, *SIZES, *SUPERLATIVES, *COMPARATIVES}
    | {w for r in RELATIONS for w in r.split()}
)


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: attributes and its tight pixel box ``xyxy`` (x2, y2 exclusive, i.e. pixel edges)."""

    kind: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2.0

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "size": self.size, "box": list(self.box)}


@dataclass(frozen=True)
class NounPhrase:
    size: Optional[str] = None
    colour: Optional[str] = None
    kind: Optional[str] = None  # None -> the head word is "shape"

    def text(self) -> str:
        words = [w for w in (self.size, self.colour) if w]
        return " ".join(words + [self.kind or "shape"])

    def matches(self, o: SceneObject) -> bool:
        return (
            (self.size is None or o.size == self.size)
            and (self.colour is None or o.colour == self.colour)
            and (self.kind is None or o.kind == self.kind)
        )


def noun_phrases(o: SceneObject, with_size: bool = True) -> list[NounPhrase]:
    """All noun phrases true of ``o`` (each of size / colour / kind kept or dropped, at least one kept)."""
    out = []
    for s in ((None, o.size) if with_size else (None,)):
        for c in (None, o.colour):
            for k in (None, o.kind):
                if s or c or k:
                    out.append(NounPhrase(s, c, k))
    return out


# ----------------------------------------------------------------------------------------------------- resolver
class ParseError(ValueError):
    pass


def _parse_np(tokens: list[str], i: int) -> tuple[NounPhrase, int]:
    size = colour = None
    if i < len(tokens) and tokens[i] in SIZES:
        size, i = tokens[i], i + 1
    if i < len(tokens) and tokens[i] in COLOURS:
        colour, i = tokens[i], i + 1
    if i >= len(tokens) or (tokens[i] not in KINDS and tokens[i] != "shape"):
        raise ParseError(f"expected a kind or 'shape' at word {i}: {' '.join(tokens)!r}")
    kind = tokens[i] if tokens[i] in KINDS else None
    return NounPhrase(size, colour, kind), i + 1


def _axis(o: SceneObject, word: str) -> float:
    """Signed coordinate that grows towards ``word``'s direction (leftmost/left of -> smaller x is 'more')."""
    return {"left": -o.cx, "right": o.cx, "top": -o.cy, "above": -o.cy, "bottom": o.cy, "below": o.cy}[word]


def resolve(expression: str, objects: Sequence[SceneObject], margin: float) -> tuple[set[int], set[int]]:
    """Interpret ``expression`` on ``objects``; returns (certain referents, possible referents) as index sets.

    Raises :class:`ParseError` for text outside the grammar.
    """
    tokens = expression.split()
    if not tokens or tokens[0] != "the":
        raise ParseError(f"expression must start with 'the': {expression!r}")
    i = 1
    mod = None
    if i < len(tokens) and tokens[i] in SUPERLATIVES + COMPARATIVES:
        mod, i = tokens[i], i + 1
    np_, i = _parse_np(tokens, i)
    cands = [j for j, o in enumerate(objects) if np_.matches(o)]
    if i == len(tokens):
        if mod is None:
            return set(cands), set(cands)
        if mod in COMPARATIVES:
            if np_.size is not None or len(cands) != 2:
                return set(), set()
            a, b = (objects[j] for j in cands)
            if a.size == b.size:
                return set(), set()
            want = "large" if mod == "larger" else "small"
            pick = {j for j in cands if objects[j].size == want}
            return pick, pick
        d = mod[: -len("most")]  # leftmost -> left
        certain, possible = set(), set()
        for j in cands:
            v = _axis(objects[j], d)
            others = [_axis(objects[k], d) for k in cands if k != j]
            if all(v >= w + margin for w in others):
                certain.add(j)
            if not any(w >= v + margin for w in others):
                possible.add(j)
        return certain, possible
    if mod is not None:
        raise ParseError(f"a superlative/comparative cannot take a relation: {expression!r}")
    if tokens[i] in ("left", "right"):
        if i + 1 >= len(tokens) or tokens[i + 1] != "of":
            raise ParseError(f"expected 'of' after {tokens[i]!r}: {expression!r}")
        rel, i = tokens[i], i + 2
    elif tokens[i] in ("above", "below"):
        rel, i = tokens[i], i + 1
    else:
        raise ParseError(f"unexpected word {tokens[i]!r}: {expression!r}")
    if i >= len(tokens) or tokens[i] != "the":
        raise ParseError(f"expected 'the' before the anchor: {expression!r}")
    anchor_np, i = _parse_np(tokens, i + 1)
    if i != len(tokens):
        raise ParseError(f"trailing words: {expression!r}")
    anchors = [j for j, o in enumerate(objects) if anchor_np.matches(o)]
    if len(anchors) != 1:
        return set(), set()
    a = objects[anchors[0]]
    certain, possible = set(), set()
    for j in cands:
        if j == anchors[0]:
            continue
        delta = _axis(objects[j], rel) - _axis(a, rel)  # > 0: j lies towards `rel` of the anchor
        if delta >= margin:
            certain.add(j)
        if delta > -margin:
            possible.add(j)
    return certain, possible


def is_unique(expression: str, objects: Sequence[SceneObject], target: int, margin: float) -> bool:
    """True when ``expression`` certainly denotes ``objects[target]`` and could denote nothing else."""
    certain, possible = resolve(expression, objects, margin)
    return certain == possible == {target}


# ---------------------------------------------------------------------------------------------------- generator
def _candidates(kind: str, objects: Sequence[SceneObject], target: int, rng) -> list[str]:
    """Candidate expressions of one type for ``target`` in random order. Spatial and comparative expressions are only
    offered with a noun phrase that is ambiguous on its own, so the spatial / size word is always needed."""
    t = objects[target]

    def np_ambiguous(np_: NounPhrase) -> bool:
        return sum(np_.matches(o) for o in objects) > 1

    out: list[tuple[float, str]] = []
    if kind == "attribute":
        for np_ in noun_phrases(t):
            out.append((rng.random(), f"the {np_.text()}"))
    elif kind == "superlative":
        for np_ in noun_phrases(t):
            if np_ambiguous(np_):
                for s in SUPERLATIVES:
                    out.append((rng.random(), f"the {s} {np_.text()}"))
    elif kind == "comparative":
        for np_ in noun_phrases(t, with_size=False):
            for c in COMPARATIVES:
                out.append((rng.random(), f"the {c} {np_.text()}"))
    elif kind == "relation":
        for np_ in noun_phrases(t):
            if not np_ambiguous(np_):
                continue
            for a, ao in enumerate(objects):
                if a == target:
                    continue
                for anp in noun_phrases(ao):
                    if np_ambiguous(anp):
                        continue  # the anchor must be unique by attributes alone
                    for r in RELATIONS:
                        out.append((rng.random(), f"the {np_.text()} {r} the {anp.text()}"))
    else:
        raise ValueError(f"unknown expression type {kind!r}; expected one of {EXPRESSION_TYPES}")
    out.sort()
    return [e for _, e in out]


def generate_expression(
    objects: Sequence[SceneObject],
    target: int,
    rng,
    margin: float,
    type_weights: dict[str, float],
) -> Optional[tuple[str, str]]:
    """Pick an expression type by ``type_weights`` (falling back to the others) and return ``(expression, type)``
    whose referent is exactly ``objects[target]``; None when no expression in the grammar is unambiguous."""
    types = [t for t in EXPRESSION_TYPES if type_weights.get(t, 0.0) > 0]
    while types:
        w = [type_weights[t] for t in types]
        r = rng.random() * sum(w)
        k = 0
        while k < len(types) - 1 and r >= w[k]:
            r -= w[k]
            k += 1
        kind = types.pop(k)
        for expr in _candidates(kind, objects, target, rng):
            if is_unique(expr, objects, target, margin):
                return expr, kind
    return None
