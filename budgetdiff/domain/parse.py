"""Lenient prompt parsing: read scene prompts as people write them, or say why not.

``scenes.parse_prompt`` only reads the domain's own phrasings (``spec_to_prompt``). Production
users of the image service type prompts freely ("a big red ball in the centre, grey backdrop"),
and the shadow evaluator still needs a :class:`~budgetdiff.domain.scenes.SceneSpec` to score the served
image with ``attr_acc``. :func:`parse_prompt_lenient` gives it one, or a short human reason why
it cannot::

    >>> out = parse_prompt_lenient("Two tiny red circles, top-left and bottom-right corner, on grey.")
    >>> out.spec is not None, out.strict
    (True, False)
    >>> out.normalized
    'two small red circles at the top left and at the bottom right on a gray background'
    >>> parse_prompt_lenient("a small teal circle in the center on a white background").reason
    "unknown colour 'teal' (known: red, green, blue, yellow, purple, orange, pink, cyan)"

How it reads a prompt:

1. ``scenes.parse_prompt`` is tried on the text as is. For the domain's own phrasings the
   outcome is exactly its spec (``strict=True``, ``normalized`` is the prompt itself).
2. Otherwise the text is normalised by the named rules of :data:`RULES` (spelling, synonyms,
   punctuation, request prefixes, ...) and read by a tolerant grammar of the domain that accounts
   for every word: the background phrase, then object groups (count, size, texture, colour,
   shape) each followed by its grid positions. The groups are written back as a canonical prompt
   (``normalized``), and the spec is ``scenes.parse_prompt(normalized)``, so it is the same type,
   canonical form and vocabulary as for the domain's own prompts.

It never guesses: an out-of-vocabulary word, a vague or contradictory count, an ambiguous
position ("the top corner"), a relation ("next to the square"), a negation, a missing size,
colour, shape, position or background gives ``spec=None`` and a ``reason``, because a wrong spec
would make ``attr_acc`` lie. Even when ``scenes.parse_prompt`` accepts a prompt, the tolerant
grammar reads it too: ``scenes.parse_prompt`` silently skips words it does not expect (a leading
object without an article, "of the blue square", "not"), so where the two readings disagree the
outcome is the careful one (``strict=False``), or ``spec=None`` with the reason.

:func:`parse_stated_scene` is the same grammar for scoring ``domain/attr_acc`` on what a prompt
states: a missing size, colour, position, shape ('a red shape') or background is left unstated
rather than refused, and an attribute or background word outside the domain ('teal', 'medium',
'light gray') is left unscored with a note, instead of refusing the whole prompt. It returns a
:class:`StatedScene`; everything else it refuses exactly as above.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields

from budgetdiff.domain.scenes import (
    BACKGROUNDS,
    COLORS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    TEXTURES,
    PromptParseError,
    SceneSpec,
    parse_prompt,
)

__all__ = ["RULES", "ParseOutcome", "StatedObject", "StatedScene", "parse_prompt_lenient", "parse_stated_scene"]

_MAX_REASON = 240  # characters; a reason quotes the prompt's words, which can be arbitrarily long
_DEBUG = False  # tests set it to see a bug's traceback instead of an 'internal error' reason


@dataclass(frozen=True)
class ParseOutcome:
    """What :func:`parse_prompt_lenient` made of one prompt.

    Attributes:
        spec: the canonical scene spec (objects sorted, seed 0, like ``scenes.parse_prompt``),
            or None when the prompt cannot be read without guessing.
        reason: None when ``spec`` is set; otherwise a short sentence saying what is wrong.
        normalized: when ``spec`` is set, a prompt in the domain's own phrasing with
            ``scenes.parse_prompt(normalized) == spec`` (the prompt itself when ``strict``);
            None otherwise.
        strict: True when ``scenes.parse_prompt`` accepted the prompt as is and ``spec`` is its
            result.
        rules_applied: names (keys of :data:`RULES`) of the normalisations the reading needed,
            in the order they fired; empty for the domain's own phrasings.
    """

    spec: SceneSpec | None
    reason: str | None
    normalized: str | None
    strict: bool
    rules_applied: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.spec is not None


@dataclass(frozen=True)
class StatedObject:
    """One object as a prompt states it: each attribute is a domain value, or None when the
    prompt leaves it unstated or names it with a word outside the domain ("teal", "medium").

    An object without a texture word is plain, as in the domain's own prompts (they never say
    "plain"); its texture is None only when the prompt names a texture outside the domain.
    """

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    texture: str | None = None

    @property
    def stated(self) -> tuple[str, ...]:
        """The attributes the prompt states, in the order color, shape, size, position, texture."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    @property
    def cell(self) -> tuple[int, int] | None:
        """(row, column) of the stated grid cell, or None."""
        return None if self.position is None else divmod(POSITIONS.index(self.position), 3)

    def describe(self) -> str:
        """The object in words, from what is stated ("red circle in the center", "large object")."""
        words = [self.size, None if self.texture == "plain" else self.texture, self.color, self.shape or "object"]
        where = "" if self.position is None else " in the center" if self.position == "center" else f" at the {self.position}"
        return " ".join(w for w in words if w) + where


@dataclass(frozen=True)
class StatedScene:
    """A scene as a prompt states it, for scoring ``domain/attr_acc`` on what is stated only.

    Attributes:
        objects: one :class:`StatedObject` per object (a count of two gives two objects).
        background: the background colour, or None when unstated or outside the domain.
        skipped: notes naming each word outside the domain that was left unscored.
    """

    objects: tuple[StatedObject, ...]
    background: str | None = None
    skipped: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: SceneSpec) -> "StatedScene":
        """A full spec: every attribute of every object and the background stated (same order)."""
        return cls(objects=tuple(StatedObject(o.color, o.shape, o.size, o.position, o.texture) for o in spec.objects),
                   background=spec.background)

    @property
    def complete(self) -> bool:
        """True when every attribute and the background are stated."""
        return self.background is not None and all(len(o.stated) == len(fields(o)) for o in self.objects)

    def scored(self) -> dict:
        """What ``domain/attr_acc`` scores for this scene, as JSON:
        {"objects": [{"object": description, "attributes": [...]}, ...], "background": bool}."""
        return {"objects": [{"object": o.describe(), "attributes": list(o.stated)} for o in self.objects],
                "background": self.background is not None}


# --------------------------------------------------------------------------------------------
# The rules table. Every normalisation has a name here; ParseOutcome.rules_applied uses them.
# --------------------------------------------------------------------------------------------
RULES: dict[str, str] = {
    # text rules, applied in this order to the whole prompt
    "unicode": "typographic characters to ASCII (curly quotes, dashes, accents: centré -> centre)",
    "lowercase": "capital letters to lower case",
    "punctuation": "drop . ! ? quotes and brackets; ';' to ','; ':' to a space; '&'/'+' to 'and'",
    "hyphen": "hyphens, slashes and underscores to spaces ('top-left', 'polka-dot')",
    "whitespace": "collapse repeated, leading and trailing whitespace",
    "request_prefix": "drop leading requests and framings ('please draw', 'an image of', 'show me a picture of')",
    "there_is": "drop 'there is' / 'there are'",
    "british_spelling": "centre->center, centred->centered, colour->color, grey->gray",
    "conjunction": "'as well as', 'along with', 'together with', 'plus' (before a count) -> 'and'",
    "digit_count": "digit counts 1-4 -> one..four",
    "count_phrase": "'a single'/'single' -> one, 'a pair of'/'pair of' -> two",
    "size_synonym": "tiny/little -> small; big/huge -> large (the domain has exactly two sizes)",
    "shape_synonym": "disc/disk -> circle, rhombus/lozenge -> diamond, plus (sign) -> cross",
    "texture_synonym": "stripy/stripey -> striped; polka dot(ted)/spotted/spotty/dotty -> dotted; solid -> plain",
    "position_synonym": ("upper/lower -> top/bottom; '-hand'; 'corner'/'side'; 'top center' -> top, "
                         "'center left' -> left; 'of the image/picture/canvas'; 'centered' -> center"),
    "center_emphasis": ("emphasis on the center dropped: 'right/smack in the middle', 'dead center', "
                        "'in the very/exact center'"),
    # grammar rules, fired while reading the normalised text
    "background_phrase": ("background phrasings other than the domain's ('on white', 'gray backdrop', "
                          "'with a black background', 'background: beige', 'in front of a white wall')"),
    "position_phrase": "positions without 'at the'/'in the' ('top left', 'on the left', 'to the right')",
    "implicit_count": "no count word: a singular noun is one object, a plural one object per position",
    "number_agreement": "noun number disagreeing with the count ('one circles', 'two circle')",
    "post_noun_attribute": "attributes after the noun ('a circle with stripes', 'a small circle in red')",
    "distributive_positions": "'two circles, one at the top and one at the left'",
    "filler_words": "verbs between an object and its position ('a red circle is placed at the top')",
    "attribute_order": "adjectives in another order than size, texture, colour ('a red small circle')",
}


def _rx(pattern: str) -> re.Pattern:
    return re.compile(pattern)


_COUNT_RE = r"(?:a|an|one|two|three|four|\d+)"
# (rule name, pattern, replacement), applied in order after the character-level rules.
_TEXT_RULES: tuple[tuple[str, re.Pattern, str], ...] = (
    ("there_is", _rx(r"\bthere (?:is|are|s)\b|\btheres\b"), " "),
    ("british_spelling", _rx(r"\bcentre\b"), "center"),
    ("british_spelling", _rx(r"\bcentred\b"), "centered"),
    ("british_spelling", _rx(r"\bcolour"), "color"),
    ("british_spelling", _rx(r"\bgrey\b"), "gray"),
    ("conjunction", _rx(r"\b(?:as well as|along with|together with)\b"), "and"),
    ("conjunction", _rx(r"\bplus(?= (?:" + _COUNT_RE + r")\b)"), "and"),
    ("digit_count", _rx(r"\b1\b"), "one"),
    ("digit_count", _rx(r"\b2\b"), "two"),
    ("digit_count", _rx(r"\b3\b"), "three"),
    ("digit_count", _rx(r"\b4\b"), "four"),
    ("count_phrase", _rx(r"\ba single\b"), "a"),
    ("count_phrase", _rx(r"\bsingle\b"), "one"),
    ("count_phrase", _rx(r"\b(?:a )?pair of\b"), "two"),
    ("size_synonym", _rx(r"\b(?:tiny|little)\b"), "small"),
    ("size_synonym", _rx(r"\b(?:big|huge)\b"), "large"),
    ("shape_synonym", _rx(r"\b(?:disc|disk)s\b"), "circles"),
    ("shape_synonym", _rx(r"\b(?:disc|disk)\b"), "circle"),
    ("shape_synonym", _rx(r"\b(?:rhombuses|rhombi|lozenges)\b"), "diamonds"),
    ("shape_synonym", _rx(r"\b(?:rhombus|lozenge)\b"), "diamond"),
    ("shape_synonym", _rx(r"\b(?:plus signs|pluses)\b"), "crosses"),
    ("shape_synonym", _rx(r"\bplus(?: sign)?\b"), "cross"),
    ("texture_synonym", _rx(r"\bstrip(?:y|ey)\b"), "striped"),
    ("texture_synonym", _rx(r"\bpolka dotted\b"), "dotted"),
    ("texture_synonym", _rx(r"\bpolka dots\b"), "dots"),
    ("texture_synonym", _rx(r"\bpolka dot\b"), "dotted"),
    ("texture_synonym", _rx(r"\b(?:spotted|spotty|dotty)\b"), "dotted"),
    ("texture_synonym", _rx(r"\bsolid\b"), "plain"),
    ("position_synonym", _rx(r"\bupper\b"), "top"),
    ("position_synonym", _rx(r"\blower\b"), "bottom"),
    ("position_synonym", _rx(r"\b(left|right) hand\b"), r"\1"),
    # 'right' here is emphasis, not the right column ("right in the middle"); not after 'the/at/to/on'
    ("center_emphasis", _rx(r"(?<!\bthe )(?<!\bat )(?<!\bto )(?<!\bon )\b(?:right|smack(?: dab)?) (?=(?:in|at) "
                            r"(?:the )?(?:center|middle)\b)"), ""),
    ("center_emphasis", _rx(r"\b(?:very|exact|dead|precise) (?=(?:center|middle)\b)"), ""),
)

_REQUEST_PREFIX_RE = re.compile(
    r"^(?:please|kindly|can you|could you|would you|will you|i want|i would like|id like|i need|"
    r"draw me|draw|generate|create|render|make|paint|sketch|produce|show me|show|give me|"
    r"(?:a|an|the)? ?(?:image|picture|photo|photograph|illustration|drawing|painting|render|rendering|"
    r"scene|composition)(?: of| with| showing| containing| featuring| that shows| that has| where)?"
    r")\b,? ?"
)
_TRAILING_PLEASE_RE = re.compile(r",? please$")


def _apply_text_rules(text: str, fired: list[str]) -> str:
    def step(name: str, new: str) -> str:
        nonlocal text
        if new != text:
            fired.append(name)
            text = new
        return text

    step("unicode", _to_ascii(text))
    step("lowercase", text.lower())
    irregular_space = " ".join(text.split()) != text
    punct = re.sub(r"(?<=[a-z])'(?=[a-z])", "", text)  # there's -> theres, don't -> dont
    punct = re.sub(r"[.!?\"'`()\[\]{}*]", " ", punct)
    punct = re.sub(r"\s*;\s*", ", ", punct).replace(":", " ")
    punct = re.sub(r"\s*[&+]\s*", " and ", punct)
    punct = re.sub(r"\s*,[\s,]*", ", ", punct)  # comma spacing, doubled commas
    if " ".join(punct.split()) != " ".join(text.split()):
        fired.append("punctuation")
    text = punct
    if re.search(r"[-_/]", text):
        fired.append("hyphen")
        text = re.sub(r"[-_/]", " ", text)
    if irregular_space:
        fired.append("whitespace")
    text = " ".join(text.split()).strip(" ,")
    # request prefixes, repeatedly ("please draw an image of ...")
    stripped = text
    while True:
        new = _REQUEST_PREFIX_RE.sub("", stripped, count=1).strip(" ,")
        new = _TRAILING_PLEASE_RE.sub("", new)
        if new == stripped:
            break
        stripped = new
    step("request_prefix", stripped)
    for name, pattern, repl in _TEXT_RULES:
        step(name, " ".join(pattern.sub(repl, text).split()))
    return text


def _to_ascii(text: str) -> str:
    text = (text.replace("\u2018", "'").replace("\u2019", "'").replace("\u201c", '"')
            .replace("\u201d", '"').replace("\u2013", "-").replace("\u2014", "-").replace("\u00a0", " "))
    # Accents off (e.g. "centré"), but keep characters that have no ASCII form, so they are
    # reported rather than silently dropped.
    out = []
    for ch in text:
        if ord(ch) < 128:
            out.append(ch)
            continue
        base = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
        out.append(base if base else ch)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Vocabulary of the grammar
# --------------------------------------------------------------------------------------------
_PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_BIG_COUNTS = {"zero": 0, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
               "eleven": 11, "twelve": 12, "dozen": 12, "hundred": 100}
_VAGUE_COUNTS = {"some", "several", "many", "few", "multiple", "couple", "various", "numerous",
                 "lots", "bunch", "group", "row", "all", "both", "each", "every"}
_NEGATIONS = {"no", "not", "without", "except", "excluding", "nor", "none", "never", "neither",
              "dont", "doesnt", "isnt", "arent", "cant", "cannot", "shouldnt", "wont", "instead"}
_RELATIONAL = {"above", "below", "under", "beneath", "underneath", "over", "beside", "besides", "next",
               "near", "nearby", "between", "behind", "inside", "within", "around", "surrounding",
               "surrounded", "adjacent", "touching", "overlapping", "across", "along", "close",
               "front", "opposite", "diagonal", "diagonally", "beyond", "toward", "towards"}
_OTHER_COLOURS = {"teal", "brown", "magenta", "violet", "indigo", "turquoise", "navy", "maroon", "lime",
                  "olive", "gold", "golden", "silver", "crimson", "scarlet", "tan", "cream", "ivory",
                  "lavender", "lilac", "aqua", "azure", "khaki", "coral", "salmon", "peach", "mint",
                  "fuchsia", "amber", "rose", "charcoal", "bronze", "copper", "burgundy", "emerald",
                  "ochre", "sepia", "mauve", "plum", "rust", "sand", "transparent", "colorless",
                  "multicolored", "rainbow", "grayish", "reddish", "bluish", "greenish", "pinkish"}
_SHADES = {"light", "dark", "pale", "bright", "deep", "pastel", "neon", "vivid", "dull", "dim",
           "darker", "lighter", "brighter", "hot", "baby", "royal", "sky", "off"}
_GENERIC_NOUNS = {"shape", "shapes", "object", "objects", "thing", "things", "item", "items",
                  "figure", "figures", "form", "forms", "one", "ones", "symbol", "symbols"}
# nouns that name an object without its shape; the partial reading leaves the shape unstated
# ('one'/'ones' point back at another object's shape and stay refused)
_PARTIAL_NOUNS = _GENERIC_NOUNS - {"one", "ones"}
_OTHER_SHAPES = {"star", "heart", "rectangle", "oval", "ellipse", "hexagon", "pentagon", "octagon",
                 "ring", "line", "arrow", "crescent", "moon", "ball", "box", "cube", "sphere", "dot",
                 "blob", "polygon", "trapezoid", "parallelogram", "spiral", "cone", "cylinder",
                 "pyramid", "x"}
_OTHER_SIZES = {"medium", "mid", "average", "normal", "midsized", "moderate", "regular", "tall",
                "wide", "long", "short", "thin", "fat", "giant", "enormous", "massive", "mini",
                "smaller", "larger", "bigger", "biggest", "smallest", "largest", "micro", "gigantic"}
_OTHER_TEXTURES = {"checkered", "checked", "chequered", "plaid", "hatched", "textured", "patterned",
                   "wavy", "zigzag", "gradient", "outlined", "hollow", "shaded", "speckled", "swirly",
                   "tartan", "crosshatched", "dashed", "filled", "empty", "glossy", "matte", "shiny"}
_FILLERS_IN_DESCRIPTION = {"colored", "color", "shaped"}
_BG_NOUNS = {"background", "backdrop", "canvas", "wall"}
_BG_PREPS = {"on", "in", "against", "over", "with", "behind", "of"}
_BG_QUANTIFIERS = {"all", "both", "everything"}  # "..., all on a white background"
_DETS = {"a", "an", "the"}
_SEPARATORS = {",", "and", "also", "then", "while", "with", "plus"}
_POSITION_PREPS = {"at", "in", "on", "to"}
_VERTICAL = {"top", "bottom"}
_HORIZONTAL = {"left", "right"}
_CENTER = {"center", "middle"}
_POSITION_EXTRAS = {"corner", "corners", "side", "sides", "edge"}
_POSITION_FILLERS = {"is", "are", "placed", "located", "positioned", "sitting", "sits", "lies", "lying",
                     "appears", "appearing", "drawn", "shown", "standing", "stands"}
_POSITION_WORDS = _VERTICAL | _HORIZONTAL | _CENTER | _POSITION_EXTRAS
_IMAGE_NOUNS = {"image", "picture", "canvas", "frame", "scene", "grid", "composition", "photo",
                "drawing", "painting", "screen", "page", "background"}
_TEXTURE_NOUNS = {"stripes": "striped", "dots": "dotted", "spots": "dotted"}
_COLOUR_LIKE = set(BACKGROUNDS) | set(COLORS) | _OTHER_COLOURS
_CANONICAL_RUNS = {tuple(p.split()) for p in POSITIONS} | {("middle",)}

_KNOWN = {
    "colour": ", ".join(COLORS),
    "background": ", ".join(BACKGROUNDS),
    "shape": ", ".join(SHAPES),
    "size": ", ".join(SIZES),
    "texture": ", ".join(TEXTURES),
    "position": ", ".join(POSITIONS),
}


class _Unparseable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _short(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------------
@dataclass
class _Group:
    count: int | None = None
    size: str | None = None
    texture: str | None = None
    color: str | None = None
    shape: str | None = None
    plural: bool = False
    words: list[str] | None = None  # the description as written, for reasons
    positions: list[str] | None = None
    subcounts: list[list] | None = None  # [[count, n_positions], ...] for "one at ..., one at ..."
    noun: str | None = None  # a generic noun ('shape', 'object') standing for an unstated shape (partial)
    skipped: dict[str, str] | None = None  # attribute -> the word outside the domain it was given (partial)
    plain_by_default: bool = False  # no texture word: plain, as in the domain's prompts

    def describe(self) -> str:
        parts = [p for p in (self.size, None if self.texture in (None, "plain") else self.texture,
                             self.color) if p]
        noun = (SHAPE_PLURALS[self.shape] if self.plural else self.shape) if self.shape else self.noun or "object"
        return "the " + " ".join(parts + [noun])


class _Reader:
    """Reads the normalised token list; records grammar rules in ``fired``.

    With ``partial`` (``parse_stated_scene``) a missing size, colour, shape (a generic noun such as
    'shape'), position or background is left unstated instead of refused, and an attribute or
    background word outside the domain (in the out-of-domain vocabularies above) is left unscored
    with a note in ``skipped``. Everything else (unknown words, relations, negations, ambiguous
    counts or positions) is refused as without it.
    """

    def __init__(self, tokens: list[str], fired: list[str], partial: bool = False):
        self.tokens = tokens
        self.fired = fired
        self.partial = partial
        self.skipped: list[str] = []

    def fire(self, rule: str) -> None:
        self.fired.append(rule)

    def at(self, i: int) -> str | None:
        return self.tokens[i] if 0 <= i < len(self.tokens) else None

    # ---------------------------------------------------------------- background
    def take_background(self) -> str | None:
        """The background colour, with its phrase removed from the tokens; None (partial only)
        when none is named or its colour is outside the domain."""
        toks = self.tokens
        found: list[tuple[str, int, int, bool]] = []  # (colour, start, end_exclusive, canonical)
        for j, tok in enumerate(toks):
            if tok not in _BG_NOUNS:
                continue
            if self.at(j - 1) == "of" or (self.at(j - 1) in _DETS and self.at(j - 2) == "of"):
                # "in the center of the canvas": part of a position, not a background
                continue
            found.append(self._background_at(j))
        if not found:
            found = self._background_on_colour()
        if not found:
            if self.partial:
                return None
            raise _Unparseable(
                f"no background colour found (say e.g. 'on a white background'; known: {_KNOWN['background']})"
            )
        if len(found) > 1:
            names = ", ".join(repr(name) for name in list(dict.fromkeys(f[0] for f in found))[:4])
            raise _Unparseable(f"{len(found)} backgrounds named ({names}); a scene has one")
        colour, start, end, canonical = found[0]
        if colour not in BACKGROUNDS and self.partial:
            self.skipped.append(f"background colour '{colour}' is outside the domain (known: "
                                f"{_KNOWN['background']}): background not scored")
            self.tokens = toks[:start] + [","] + toks[end:]
            return None
        if colour not in BACKGROUNDS:
            if colour in COLORS:
                raise _Unparseable(
                    f"'{colour}' is not a background colour of the scene domain (known: {_KNOWN['background']})"
                )
            raise _Unparseable(f"unknown background colour '{colour}' (known: {_KNOWN['background']})")
        if not canonical:
            self.fire("background_phrase")
        self.tokens = toks[:start] + [","] + toks[end:]
        return colour

    def _background_at(self, j: int) -> tuple[str, int, int, bool]:
        """The background phrase around the background noun at ``j``:
        '[prep] [det] [plain] COLOUR [colored] NOUN' or 'NOUN [color] [is|of] COLOUR'."""
        toks = self.tokens
        k = j - 1
        while self.at(k) in _FILLERS_IN_DESCRIPTION:
            k -= 1
        word = self.at(k)
        if word in _COLOUR_LIKE:
            if self.at(k - 1) in _SHADES:
                if not self.partial:
                    raise _Unparseable(
                        f"colour shade '{self.at(k - 1)} {word}' is not in the domain (known backgrounds: "
                        f"{_KNOWN['background']})"
                    )
                word = f"{self.at(k - 1)} {word}"  # outside the domain: take_background skips it
                k -= 1
            start = k
            plain = self.at(start - 1) in ("plain", "simple", "uniform", "flat")
            start -= plain
            det = None
            if self.at(start - 1) in _DETS:
                start -= 1
                det = toks[start]
            prep = None
            if start >= 3 and toks[start - 3:start] == ["in", "front", "of"]:
                start -= 3
                prep = "in front of"
            elif self.at(start - 1) in _BG_PREPS:
                start -= 1
                prep = toks[start]
            quantified = prep is not None and self.at(start - 1) in _BG_QUANTIFIERS
            start -= quantified
            domain_words = not plain and not quantified and k == j - 1 and toks[j] in ("background", "backdrop")
            canonical = domain_words and (
                (prep in ("on", "against") and det in ("a", "an"))
                or (prep is None and det is None and self.at(start - 1) == ",")
                or (prep is None and det in ("a", "an") and start == 0 and self.at(j + 1) == "with")
            )
            return word, start, j + 1, canonical
        after = self._colour_after(j)
        if after is not None:
            colour, end = after
            start = j
            if self.at(start - 1) in _DETS:
                start -= 1
            if self.at(start - 1) in _BG_PREPS:
                start -= 1
            return colour, start, end, False
        if word is not None and word not in _DETS | _BG_PREPS | _SEPARATORS | _POSITION_WORDS:
            raise _Unparseable(f"unknown background colour '{word}' (known: {_KNOWN['background']})")
        raise _Unparseable(f"no colour given for the background (known: {_KNOWN['background']})")

    def _colour_after(self, j: int) -> tuple[str, int] | None:
        """'background color is white', 'background of white', 'background white'."""
        k = j + 1
        if self.at(k) == "color":
            k += 1
        if self.at(k) in ("is", "of", "in"):
            k += 1
        if self.at(k) in _SHADES and self.at(k + 1) in _COLOUR_LIKE:
            if self.partial:
                return f"{self.at(k)} {self.at(k + 1)}", k + 2  # outside the domain: skipped
            raise _Unparseable(
                f"colour shade '{self.at(k)} {self.at(k + 1)}' is not in the domain (known backgrounds: "
                f"{_KNOWN['background']})"
            )
        if self.at(k) in _COLOUR_LIKE:
            return self.tokens[k], k + 1
        return None

    def _background_on_colour(self) -> list[tuple[str, int, int, bool]]:
        """'... on white', 'on a gray, ...': 'on' and a colour word ending a clause."""
        toks = self.tokens
        out = []
        for i, tok in enumerate(toks):
            if tok != "on":
                continue
            k = i + 1 + (self.at(i + 1) in _DETS)
            if self.at(k) in _COLOUR_LIKE and self.at(k + 1) in (None, ","):
                start = i - (self.at(i - 1) in _BG_QUANTIFIERS)
                out.append((toks[k], start, k + 1, False))
        return out

    # ---------------------------------------------------------------- objects
    def read_groups(self) -> list[_Group]:
        groups = []
        i = 0
        while i < len(self.tokens):
            if self.tokens[i] in _SEPARATORS:
                i += 1
                continue
            group, i = self._group(i)
            groups.append(group)
        if not groups:
            raise _Unparseable("no object found")
        return groups

    def _count(self, i: int) -> tuple[int | None, int]:
        tok = self.tokens[i]
        if tok in _COUNTS:
            return _COUNTS[tok], i + 1
        if tok.isdigit() or tok in _BIG_COUNTS:
            n = int(tok) if tok.isdigit() else _BIG_COUNTS[tok]
            if n == 0:
                raise _Unparseable("a count of zero objects")
            if n == 1:
                return 1, i + 1
            raise _Unparseable(f"{n} objects in one group, but a scene holds at most {MAX_OBJECTS}")
        if tok in _VAGUE_COUNTS:
            raise _Unparseable(f"vague count '{tok}'; say how many (one to {NUMBER_WORDS[MAX_OBJECTS]})")
        if tok == "the":
            return None, i + 1
        return None, i

    def _group(self, i: int) -> tuple[_Group, int]:
        g = _Group(words=[], positions=[], subcounts=[], skipped={})
        start = i
        g.count, i = self._count(i)
        order: list[str] = []
        # description: adjectives then the shape noun
        while True:
            tok = self.at(i)
            so_far = " ".join(self.tokens[start:i]) or "the start"
            if tok is None or tok in _POSITION_PREPS or tok in _POSITION_WORDS or tok in ("and", "with"):
                what = " ".join(self.tokens[start:i])
                if not what:
                    raise _Unparseable(f"no object described before '{tok}'" if tok else "no object found")
                raise _Unparseable(f"no shape named in '{what}' (known shapes: {_KNOWN['shape']})")
            i += 1
            if tok == ",":
                continue
            if tok in SIZES:
                self._set(g, "size", tok)
                order.append("size")
            elif tok in TEXTURES:
                self._set(g, "texture", tok)
                order.append("texture")
            elif tok in COLORS:
                self._set(g, "color", tok)
                order.append("color")
            elif tok in SHAPES or tok in _PLURAL_TO_SHAPE:
                g.shape = tok if tok in SHAPES else _PLURAL_TO_SHAPE[tok]
                g.plural = tok not in SHAPES
                break
            elif tok in _FILLERS_IN_DESCRIPTION:
                continue
            elif self.partial and tok in _PARTIAL_NOUNS and self._noun_slot(i):
                g.noun, g.plural = tok, tok.endswith("s")  # 'a red shape': the shape is unstated
                break
            elif self.partial and (taken := self._skip_outside_domain(g, tok, i)) is not None:
                i = taken
            else:
                self._unknown_in_description(tok, i, so_far)
        expected = [a for a in ("size", "texture", "color") if a in order]
        if order != expected:
            self.fire("attribute_order")
        while self.at(i) in ("shape", "shaped"):
            i += 1
        # positions (and the odd attribute after the noun)
        i = self._positions(g, i)
        self._finish(g)
        return g, i

    def _set(self, g: _Group, attr: str, value: str, skip: bool = False) -> None:
        """Give ``g`` its ``attr``; with ``skip``, a word outside the domain left unscored."""
        old = getattr(g, attr) or (g.skipped or {}).get(attr)
        if old is not None and old != value:
            name = "colour" if attr == "color" else attr
            raise _Unparseable(f"two {name}s ('{old}' and '{value}') for one object")
        if skip:
            g.skipped[attr] = value
        else:
            setattr(g, attr, value)

    def _noun_slot(self, i: int) -> bool:
        """Whether the word before ``i`` ends a description (what follows cannot be part of it)."""
        nxt = self.at(i)
        return nxt is None or nxt in _SEPARATORS | _POSITION_PREPS | _POSITION_WORDS | {"of"} or nxt in _COUNTS

    def _skip_outside_domain(self, g: _Group, tok: str, i: int) -> int | None:
        """Partial reading: an attribute word outside the domain ('teal', 'light blue', 'medium',
        'checkered') is left unscored; returns the index after it, or None for any other word."""
        nxt = self.at(i)
        if tok in _SHADES and nxt in _COLOUR_LIKE:
            self._set(g, "color", f"{tok} {nxt}", skip=True)
            return i + 1
        for attr, words in (("color", set(BACKGROUNDS) | _OTHER_COLOURS), ("size", _OTHER_SIZES),
                            ("texture", _OTHER_TEXTURES)):
            if tok in words:
                self._set(g, attr, tok, skip=True)
                return i
        return None

    def _unknown_in_description(self, tok: str, i: int, context: str) -> None:
        nxt = self.at(i)
        noun_slot = self._noun_slot(i)
        if tok in _NEGATIONS:
            raise _Unparseable(f"negation '{tok}' is not supported")
        if tok in _SHADES and nxt in _COLOUR_LIKE:
            raise _Unparseable(f"colour shade '{tok} {nxt}' is not in the domain (known: {_KNOWN['colour']})")
        if tok in BACKGROUNDS:
            raise _Unparseable(
                f"'{tok}' is a background colour, not an object colour (known: {_KNOWN['colour']})"
            )
        if tok in _OTHER_COLOURS:
            raise _Unparseable(f"unknown colour '{tok}' (known: {_KNOWN['colour']})")
        if tok in _OTHER_SIZES:
            raise _Unparseable(f"size '{tok}' is outside the scene domain (known: {_KNOWN['size']})")
        if tok in _OTHER_TEXTURES:
            raise _Unparseable(f"texture '{tok}' is outside the scene domain (known: {_KNOWN['texture']})")
        if tok in _GENERIC_NOUNS and noun_slot:
            raise _Unparseable(f"'{tok}' does not name a shape (known shapes: {_KNOWN['shape']})")
        if tok in _COUNTS or tok.isdigit() or tok in _BIG_COUNTS:
            raise _Unparseable(f"unexpected count '{tok}' inside the description '{context}'")
        if tok in _RELATIONAL:
            raise _Unparseable(f"relative placement ('{tok}') is not supported; name grid positions")
        singular = tok[:-2] if tok.endswith("es") else tok[:-1] if tok.endswith("s") else tok
        if tok in _OTHER_SHAPES or singular in _OTHER_SHAPES or noun_slot:
            raise _Unparseable(f"shape '{tok}' is outside the scene domain (known: {_KNOWN['shape']})")
        raise _Unparseable(f"unknown word '{tok}' in the description '{context} {tok}'")

    def _positions(self, g: _Group, i: int) -> int:
        prev_axes: str | None = None
        while True:
            tok = self.at(i)
            if tok is None:
                return i
            nxt = self.at(i + 1)
            if tok in _SEPARATORS:
                if tok == "with" and (nxt in _TEXTURE_NOUNS or (nxt == "polka" and self.at(i + 2) == "dots")):
                    k = i + 1 + (nxt == "polka")
                    self._set(g, "texture", _TEXTURE_NOUNS[self.tokens[k]])
                    self.fire("post_noun_attribute")
                    i = k + 1
                    continue
                i += 1
                continue
            if tok in ("centered", "centrally"):
                self._add_position(g, "center")
                self.fire("position_synonym")
                i += 1
                prev_axes = None
                continue
            if tok == "in" and nxt in _COLOUR_LIKE:
                if nxt not in COLORS and not self.partial:
                    self._unknown_in_description(nxt, i + 2, "")
                self._set(g, "color", nxt, skip=nxt not in COLORS)
                self.fire("post_noun_attribute")
                i += 2
                continue
            if tok in _COUNTS and (nxt in _POSITION_PREPS or nxt in _POSITION_WORDS - _POSITION_EXTRAS
                                   or (nxt == "the" and self.at(i + 2) in _POSITION_WORDS)):
                if g.positions and not g.subcounts:
                    raise _Unparseable(
                        f"ambiguous count: '{tok} {nxt}' after a position of {g.describe()} "
                        "(one more object, or one of them?)"
                    )
                g.subcounts.append([_COUNTS[tok], 0])
                self.fire("distributive_positions")
                i += 1
                continue
            is_position = tok in _POSITION_PREPS or tok in _POSITION_WORDS or (
                tok in _DETS - {"a", "an"} and nxt in _POSITION_WORDS
            )
            if is_position:
                i, prev_axes = self._position(g, i, prev_axes)
                continue
            if tok in _POSITION_FILLERS:
                self.fire("filler_words")
                i += 1
                continue
            if tok in _NEGATIONS:
                raise _Unparseable(f"negation '{tok}' is not supported")
            if tok in _RELATIONAL:
                raise _Unparseable(f"relative placement ('{tok}') is not supported; name grid positions")
            starts_group = (tok in _COUNTS or tok == "the" or tok.isdigit() or tok in _BIG_COUNTS
                            or tok in _VAGUE_COUNTS or tok in SIZES or tok in TEXTURES or tok in COLORS
                            or tok in SHAPES or tok in _PLURAL_TO_SHAPE or tok in _SHADES
                            or tok in _OTHER_COLOURS or tok in _OTHER_SIZES or tok in _OTHER_TEXTURES)
            if starts_group:
                return i
            raise _Unparseable(f"unknown word '{tok}' after {g.describe()}")

    def _position(self, g: _Group, i: int, prev_axes: str | None) -> tuple[int, str | None]:
        prep = det = None
        if self.at(i) in _POSITION_PREPS:
            prep = self.tokens[i]
            i += 1
        if self.at(i) in _DETS:
            det = self.tokens[i]
            i += 1
        run = []
        while self.at(i) in _POSITION_WORDS:
            run.append(self.tokens[i])
            i += 1
        if not run:
            word = self.at(i)
            if word in _RELATIONAL:
                raise _Unparseable(f"relative placement ('{prep} {word}') is not supported; name grid positions")
            if word is None:
                raise _Unparseable(f"no position after '{prep or det}' for {g.describe()}")
            raise _Unparseable(f"unknown position '{word}' (known: {_KNOWN['position']})")
        of_image = False
        if self.at(i) == "of":
            k = i + 1 + (self.at(i + 1) in _DETS)
            if self.at(k) in _IMAGE_NOUNS:
                i = k + 1
                of_image = True
            else:
                end = i + 1
                while end < min(len(self.tokens), i + 5) and self.tokens[end] not in _SEPARATORS | {"on"}:
                    end += 1
                raise _Unparseable(
                    f"relative placement ('{' '.join(run)} of {' '.join(self.tokens[i + 1:end])}') is not "
                    "supported; name grid positions"
                )
        position, axes = self._interpret(run)
        if prep is None and det is None and prev_axes is not None and axes is not None and axes != prev_axes:
            raise _Unparseable(
                f"ambiguous position list: '{' '.join(run)}' after a {'two' if len(prev_axes) > 1 else 'one'}"
                f"-word position (say 'at the top left and at the top right')"
            )
        if prep not in ("at", "in") or det != "the":
            self.fire("position_phrase")
        if tuple(run) not in _CANONICAL_RUNS or of_image:
            self.fire("position_synonym")
        self._add_position(g, position)
        return i, axes

    @staticmethod
    def _interpret(run: list[str]) -> tuple[str, str | None]:
        """A run of position words -> (grid cell, axes 'v'/'h'/'vh' or None for the center)."""
        text = " ".join(run)
        v = [w for w in run if w in _VERTICAL]
        h = [w for w in run if w in _HORIZONTAL]
        c = [w for w in run if w in _CENTER]
        corner = bool({"corner", "corners"} & set(run))
        if len(set(v)) > 1 or len(set(h)) > 1 or (v and h and c) or len(run) != len(set(run)):
            raise _Unparseable(f"contradictory position '{text}'")
        if v and h:
            return f"{v[0]} {h[0]}", "vh"
        if corner:
            which = (f"{v[0]} left or {v[0]} right?" if v else f"top {h[0]} or bottom {h[0]}?" if h
                     else "which corner?")
            raise _Unparseable(f"ambiguous position '{text}': {which}")
        if v:
            return v[0], "v"
        if h:
            return h[0], "h"
        if not c:
            raise _Unparseable(f"ambiguous position '{text}': which {run[0].rstrip('s')}?")
        if set(run) & _POSITION_EXTRAS:
            raise _Unparseable(f"ambiguous position '{text}'")
        return "center", None

    @staticmethod
    def _add_position(g: _Group, position: str) -> None:
        g.positions.append(position)
        if g.subcounts:
            g.subcounts[-1][1] += 1

    def _finish(self, g: _Group) -> None:
        desc = g.describe()
        if g.size is None and not self.partial:
            raise _Unparseable(f"no size given for {desc} (known sizes: {_KNOWN['size']})")
        if g.color is None and not self.partial:
            raise _Unparseable(f"no colour given for {desc} (known colours: {_KNOWN['colour']})")
        if not g.positions and not self.partial:
            raise _Unparseable(f"no position given for {desc} (known positions: {_KNOWN['position']})")
        for sub, n in g.subcounts:
            if sub != n:
                raise _Unparseable(f"'{NUMBER_WORDS.get(sub, sub)}' but {_plural(n, 'position')} for {desc}")
        n = len(g.positions)
        noun = SHAPE_PLURALS[g.shape] if g.shape else g.noun
        if not g.positions:  # partial: positions unstated, the count says how many objects
            if g.count is None and g.plural:
                raise _Unparseable(f"plural '{noun}' without a count or positions; say how many")
            if g.count is None:
                g.count = 1
                self.fire("implicit_count")
            n = g.count
        if g.count is None:
            if g.plural and n < 2:
                raise _Unparseable(f"plural '{noun}' but only one position; say how many")
            g.count = n if g.plural else 1
            self.fire("implicit_count")
        if g.count != n:
            raise _Unparseable(f"{_plural(g.count, 'object')} but {_plural(n, 'position')} for {desc}")
        if g.plural != (g.count > 1):
            self.fire("number_agreement")
        if g.texture is None and "texture" not in g.skipped:
            g.texture = "plain"  # the domain's prompts never say 'plain'
            g.plain_by_default = True
        for attr, word in g.skipped.items():
            name = "colour" if attr == "color" else attr
            known = _KNOWN["colour" if attr == "color" else attr]
            self.skipped.append(f"{name} '{word}' of {g.describe()} is outside the domain (known: {known}): not scored")


def _canonical_prompt(groups: list[_Group], background: str) -> str:
    def where(p: str) -> str:
        return "in the center" if p == "center" else f"at the {p}"

    phrases = []
    for g in groups:
        adjectives = [g.size] + ([g.texture] if g.texture != "plain" else []) + [g.color]
        if g.count == 1:
            head = ("an" if adjectives[0][0] in "aeiou" else "a") + " " + " ".join(adjectives) + " " + g.shape
        else:
            head = NUMBER_WORDS[g.count] + " " + " ".join(adjectives) + " " + SHAPE_PLURALS[g.shape]
        places = [where(p) for p in g.positions]
        place = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
        phrases.append(f"{head} {place}")
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{objects} on a {background} background"


def _read_groups(prompt: str, fired: list[str], partial: bool = False) -> tuple[_Reader, str | None, list[_Group]]:
    """The tolerant grammar over ``prompt``: (reader, background, object groups); raises _Unparseable."""
    text = _apply_text_rules(prompt, fired)
    if not text:
        raise _Unparseable("empty prompt" if not prompt.strip() else "no scene described")
    tokens = re.findall(r"[^\W\d_]+|\d+|,|\S", text)
    for tok in tokens:
        if not (tok == "," or re.fullmatch(r"[a-z]+|\d+", tok)):
            raise _Unparseable(f"unexpected character {tok!r}")
    for tok in tokens:
        if tok in _NEGATIONS:
            raise _Unparseable(f"negation '{tok}' is not supported")
    reader = _Reader(tokens, fired, partial)
    background = reader.take_background()
    groups = reader.read_groups()
    total = sum(g.count for g in groups)
    if total > MAX_OBJECTS:
        raise _Unparseable(f"{total} objects, but a scene holds at most {MAX_OBJECTS}")
    seen: set[str] = set()
    for g in groups:
        for p in g.positions:
            if p in seen:
                raise _Unparseable(f"two objects at the {p}; each grid cell holds one object")
            seen.add(p)
    return reader, background, groups


def _read(prompt: str) -> tuple[SceneSpec, str, tuple[str, ...]]:
    """The tolerant reading: (spec, canonical prompt, rules fired); raises _Unparseable."""
    fired: list[str] = []
    _, background, groups = _read_groups(prompt, fired)
    normalized = _canonical_prompt(groups, background)
    try:
        spec = parse_prompt(normalized)
    except PromptParseError as err:  # pragma: no cover - the grammar only writes domain phrasings
        raise _Unparseable(f"internal error: normalised prompt rejected ({err})") from err
    return spec, normalized, tuple(dict.fromkeys(fired))


def parse_prompt_lenient(prompt: str) -> ParseOutcome:
    """Read ``prompt`` into a scene spec without guessing; see the module docstring.

    Never raises for a ``str`` (an unreadable prompt gives ``spec=None`` and a ``reason``).

    Raises:
        TypeError: ``prompt`` is not a ``str``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        strict_spec = parse_prompt(prompt)
    except PromptParseError:
        strict_spec = None
    except Exception:  # noqa: BLE001 - a bug in the strict parser must not break the evaluator
        strict_spec = None
    try:
        spec, normalized, rules = _read(prompt)
    except _Unparseable as err:
        reason = _short(err.reason)
        if strict_spec is not None:
            reason += " (parse_prompt accepted it by ignoring words)"
        return ParseOutcome(spec=None, reason=reason, normalized=None, strict=False)
    except Exception as err:  # noqa: BLE001 - never raise for text input
        if _DEBUG:
            raise
        return ParseOutcome(spec=None, reason=f"internal error while reading the prompt ({err!r})",
                            normalized=None, strict=False)
    if strict_spec is not None and strict_spec == spec:
        return ParseOutcome(spec=strict_spec, reason=None, normalized=prompt, strict=True, rules_applied=rules)
    return ParseOutcome(spec=spec, reason=None, normalized=normalized, strict=False, rules_applied=rules)


def parse_stated_scene(prompt: str) -> StatedScene:
    """What ``prompt`` states about its scene, for scoring ``domain/attr_acc`` on it alone.

    A prompt that :func:`parse_prompt_lenient` reads gives its full spec (for the domain's own
    prompts exactly ``scenes.parse_prompt``'s, so their scores are what they always were; a
    prompt that ``scenes.parse_prompt`` reads only by skipping words is read carefully, or
    refused). Any other prompt is read by the same grammar in its partial form: an attribute the
    prompt does not state (a size, colour, position, the background; a shape where it says 'shape'
    or 'object') is left unstated, and an attribute or background named with a word outside the
    domain ('teal', 'light gray', 'medium', 'checkered') is left unscored with a note in
    ``skipped``. No texture word means plain, as in the domain's own prompts::

        >>> scene = parse_stated_scene("a red circle in the center on a white background")
        >>> scene.objects[0].stated, scene.background
        (('color', 'shape', 'position', 'texture'), 'white')
        >>> parse_stated_scene("two small circles on a teal background").scored()["background"]
        False

    Raises:
        PromptParseError: the prompt cannot be read without guessing (an unknown word, a shape
            outside the domain, a relation, a negation, an ambiguous count or position), or it
            states nothing the checker can judge; the message is the reason.
        TypeError: ``prompt`` is not a ``str``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    full = parse_prompt_lenient(prompt)
    if full.ok:
        return StatedScene.from_spec(full.spec)
    try:
        reader, background, groups = _read_groups(prompt, [], partial=True)
    except _Unparseable as err:
        raise PromptParseError(_short(err.reason)) from None
    except Exception as err:  # noqa: BLE001 - a bug must not stop a scorer; it reads as unscored
        if _DEBUG:
            raise
        raise PromptParseError(f"internal error while reading the prompt ({err!r})") from None
    objects = tuple(StatedObject(g.color, g.shape, g.size, position, g.texture)
                    for g in groups for position in (g.positions or [None] * g.count))
    # a texture that is plain only by default states nothing when nothing else is stated ("a thing")
    said = any(g.color or g.shape or g.size or g.positions or (g.texture and not g.plain_by_default) for g in groups)
    if background is None and not said:
        raise PromptParseError(_short("the prompt states no attribute the checker can judge"
                                      + (f" ({reader.skipped[0]})" if reader.skipped else "")))
    return StatedScene(objects=objects, background=background, skipped=tuple(reader.skipped))
