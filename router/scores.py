"""What a complexity score is, how the LLM is asked for it, and how its parts combine.

Everything both backends (transformers, vLLM) must agree on lives here, so the two can only
differ in how they run the model:

* :class:`ComplexityScore`, the result type;
* :class:`ComplexityScorer`, the interface every scorer implements;
* the prompt (:data:`INSTRUCTION`, :data:`QUERIES`, :data:`PROMPT_VERSION`) and
  :func:`build_prompt_parts`, which renders it with the model's chat template;
* :class:`CombinationRule`, the one documented rule that turns the LLM rating and the perception
  flags into the final score.

Prompt layout (why it looks like this): the long instruction comes first and the caption last,
so the rendered text up to the caption is identical for every caption and its KV cache can be
computed once. After the caption come the end of the user turn and the assistant header (shared
by all queries of one caption), and then a two-token "answer key" per query (``complexity:``,
``text:``, ``face:``, ``chart:``; the questions themselves are in the instruction). The model's
next token after the key is the answer, read from next-token probabilities: digits ``1``..``9``
for the rating, an opening quote vs ``no`` for the text flag (the model copies quoted words),
``yes``/``no`` for the face and chart flags.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cat_foundations.captions import clean_caption

# Bump whenever INSTRUCTION, QUERIES, ANSWERS, FEW_SHOT or the layout changes: cached scores are
# keyed by it.
PROMPT_VERSION = "cat-router-v2"

SOURCE_CAPTION_LLM = "caption_llm"
SOURCE_IMAGE_JPEG_BPP = "image_jpeg_bpp"

DIGITS = tuple(str(d) for d in range(1, 10))
YES_NO = ("yes", "no")

INSTRUCTION = (
    "You judge how visually complex an image is from its caption alone. An image compressor spends "
    "more tokens on complex images, so consider how hard the image is to reconstruct without a "
    "visible loss: its semantic content, the amount of fine detail and texture, the number of "
    "distinct objects, and what human perception is most sensitive to (readable text, human faces, "
    "thin lines and small labels in charts or diagrams).\n"
    "Complexity scale: 1 = a flat uniform area (a plain wall, a clear sky); 3 = a simple object on a "
    "plain background or flat clip art; 5 = an ordinary photo with a few objects; 7 = a busy scene, "
    "a portrait with facial detail, or a chart with labels; 9 = extremely dense detail such as "
    "small printed text or a crowded diagram.\n"
    "Each message gives a caption. Answer the field named at the start of your reply: "
    "'complexity:' with one digit 1-9; 'text:' the words written in the image, in quotes, or no; "
    "'face:' yes if a human face is visible; 'chart:' yes if it is a chart, plot, diagram or table. "
    "Otherwise no."
)

# Query name -> answer key: the start of the assistant's reply, after which the next token is read.
# "complexity" is the rating (answer: one digit); the others are the perception flags, reported as
# P(first answer) in ANSWERS. Keys are short on purpose: they are the only per-query tokens a
# caption pays for (the questions themselves live in INSTRUCTION, in the shared prefix).
RATING_QUERY = "complexity"
FLAG_QUERIES = ("text", "faces", "charts")
QUERIES = {RATING_QUERY: "complexity:", "text": "text:", "faces": "face:", "charts": "chart:"}

# Per flag: (answer meaning "yes", answer meaning "no"). The text flag is not asked as yes/no: a
# 0.5B model answered "readable text? yes/no" at chance (P(yes) 0.3-0.5 for sign photos and apples
# alike), but it reliably COPIES quoted words: after ``text:`` the probability of an opening quote
# (vs "no") is what is read.
ANSWERS = {RATING_QUERY: DIGITS, "text": ('"', "no"), "faces": YES_NO, "charts": YES_NO}

# Worked examples shown before every caption (invented, none from the devset). They sit in the
# shared prefix, so they cost nothing per caption. They anchor the 1-9 scale and show each answer
# key with both answers (4 "yes" and 3 "no" per flag).
FEW_SHOT = (
    ("A plain white wall.", RATING_QUERY, "1"),
    ('A shop window with a painted sign reading "FRESH BREAD".', "text", '"FRESH BREAD"'),
    ("A portrait photo of a smiling man with a grey beard.", "faces", "yes"),
    ("A line chart of monthly sales with labelled axes and a legend.", "charts", "yes"),
    ("A red apple on a wooden table.", "text", "no"),
    ("A flat icon of a house in two colours.", RATING_QUERY, "2"),
    ("A green meadow with a few trees under a cloudy sky.", "faces", "no"),
    ("A cartoon cat chasing a ball of yarn.", "charts", "no"),
    (
        'A poster with the title "Summer Festival 2019" and dates in small print.',
        "text",
        '"Summer Festival 2019"',
    ),
    ("A dog running on a beach under a clear sky.", RATING_QUERY, "5"),
    ("Two children laughing at a birthday party.", "faces", "yes"),
    ("A bar chart comparing five countries, with numbers above the bars.", "charts", "yes"),
    ("A mountain lake at sunset.", "text", "no"),
    ("A close-up of an old woman's face with wrinkles and grey hair.", RATING_QUERY, "7"),
    ("A clip art drawing of a yellow star with a thick outline.", "faces", "no"),
    ("A close-up portrait of a woman in a red scarf.", "charts", "no"),
    (
        'A screenshot of a settings menu with labels such as "Wi-Fi" and "Bluetooth".',
        "text",
        '"Wi-Fi" "Bluetooth"',
    ),
    ("A flow diagram of boxes connected by arrows with small captions.", RATING_QUERY, "8"),
    ("A bowl of oranges on a kitchen counter.", "faces", "no"),
    ("A scatter plot of two clusters of points with a legend.", "charts", "yes"),
    ("A cartoon sun drawn with thick outlines.", "text", "no"),
    ("A crowd of football fans cheering in a stadium.", "faces", "yes"),
    ("A photo of a busy street with cars and trees.", "charts", "no"),
    ('A license plate on a car reading "KB 4471".', "text", '"KB 4471"'),
    ("A page of a printed book with two columns of small text.", RATING_QUERY, "9"),
    ("A simple drawing of a blue umbrella.", "text", "no"),
    ("A histogram of test scores with a title and axis labels.", "charts", "yes"),
    ("A young man with glasses looking at the camera.", "faces", "yes"),
)

# Stand-in used to find where the caption goes in the rendered chat template.
_CAPTION_SLOT = "\u2063CAPTION\u2063"


@dataclass
class ComplexityScore:
    """Visual complexity of one image, predicted from its caption (or its pixels as a fallback).

    Args:
        score: final score in [1, 9] after :class:`CombinationRule` (what routing uses).
        rating: expected value of the LLM's 1-9 digit, in [1, 9].
        distribution: the LLM's probabilities of the digits 1..9 (nine floats summing to 1).
        flags: perception flag name -> calibrated P(yes) in [0, 1] (``text``, ``faces``,
            ``charts``), what the :class:`CombinationRule` used.
        raw_flags: the model's uncalibrated P(yes) per flag (what the score cache stores).
        source: what decided the score: ``"caption_llm"``, ``"image_jpeg_bpp"``, or a fitted
            head's ``"caption_head"`` / ``"hybrid_head"`` (:mod:`router.head`).
        predicted_lpips: a head's predicted LPIPS per ratio (``{"32": .., "16": .., "8": ..}``);
            empty for the rule and the JPEG fallback.
    """

    score: float
    rating: float
    distribution: list[float] = field(default_factory=list)
    flags: dict[str, float] = field(default_factory=dict)
    source: str = SOURCE_CAPTION_LLM
    raw_flags: dict[str, float] = field(default_factory=dict)
    predicted_lpips: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "rating": self.rating,
            "distribution": list(self.distribution),
            "flags": dict(self.flags),
            "raw_flags": dict(self.raw_flags),
            "source": self.source,
            **({"predicted_lpips": dict(self.predicted_lpips)} if self.predicted_lpips else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ComplexityScore:
        return cls(
            score=float(data["score"]),
            rating=float(data["rating"]),
            distribution=[float(p) for p in data.get("distribution", [])],
            flags={str(k): float(v) for k, v in data.get("flags", {}).items()},
            source=str(data.get("source", SOURCE_CAPTION_LLM)),
            raw_flags={str(k): float(v) for k, v in data.get("raw_flags", {}).items()},
            predicted_lpips={str(k): float(v) for k, v in data.get("predicted_lpips", {}).items()},
        )


# Fitted by ``python -m eval.router_domains --fit`` on the devset TRAIN split (294 captions,
# nested_vae/weights/default/split.json) with the default model and PROMPT_VERSION above; see
# router/README.md for the held-out numbers. Other models or prompts need their own fit.
DEFAULT_FLAG_CALIBRATION = {"text": (1.9949, -5.886), "faces": (3.4168, -2.0941), "charts": (2.1108, -3.803)}
DEFAULT_FLAG_LIFTS = {"text": 3.357, "faces": 2.398, "charts": 2.585}


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(1.0 - eps, max(eps, float(p)))
    return math.log(p / (1.0 - p))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class CombinationRule:
    """How the LLM rating and the perception flags combine into the final score.

    ``P_f = sigmoid(slope_f * logit(raw_f) + intercept_f)`` (flag calibration), then
    ``score = clip(rating + sum_f flag_lifts[f] * P_f, 1, 9)``.

    Why: the rating alone under-rates captions that mention what human perception is sensitive to
    (small text, faces, thin chart lines), which need the finer ratios even when the scene is
    otherwise simple, so those flags lift the score additively; a lift is the number of score
    points a certain "yes" adds. The raw flag probabilities of a small model are biased (P(yes) of
    a content-free caption is far from 0.5) and unevenly scaled across flags, so each flag is first
    mapped through a per-flag logistic calibration (Platt scaling). Set ``flag_calibration={}`` to
    use the raw probabilities, a lift to 0 to ignore that flag, ``flag_lifts={}`` for the rating.

    Args:
        flag_lifts: flag name -> score points added at calibrated P = 1.
        flag_calibration: flag name -> (slope, intercept) applied to the raw flag's log-odds;
            a flag not listed is used raw.

    The defaults (:data:`DEFAULT_FLAG_CALIBRATION`, :data:`DEFAULT_FLAG_LIFTS`) are FITTED for the
    default model and prompt on the devset train split by ``eval/router_domains.py --fit``: the
    calibration by logistic regression of "the image is in that flag's domain" (text / face /
    chart) on the flag's log-odds, the lifts by logistic regression of "perception-sensitive
    domain" (text, face, chart vs clip art, photo) on the rating and the calibrated flags, divided
    by the rating's weight (so the score keeps the rating's units and orders images like that
    classifier). With another model or prompt, refit them.
    """

    flag_lifts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FLAG_LIFTS))
    flag_calibration: dict[str, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_FLAG_CALIBRATION)
    )

    def calibrate_flags(self, flags: Mapping[str, float]) -> dict[str, float]:
        """Raw model P(yes) per flag -> calibrated probabilities."""
        calibrated = {}
        for name, p in flags.items():
            if name in self.flag_calibration:
                slope, intercept = self.flag_calibration[name]
                calibrated[name] = sigmoid(slope * logit(p) + intercept)
            else:
                calibrated[name] = float(p)
        return calibrated

    def combine(self, rating: float, flags: Mapping[str, float]) -> float:
        """Final score from the rating and the RAW flag probabilities."""
        calibrated = self.calibrate_flags(flags)
        lifted = rating + sum(lift * calibrated.get(name, 0.0) for name, lift in self.flag_lifts.items())
        return min(9.0, max(1.0, lifted))

    def to_dict(self) -> dict:
        return {
            "flag_lifts": dict(self.flag_lifts),
            "flag_calibration": {name: list(pair) for name, pair in self.flag_calibration.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CombinationRule:
        return cls(
            flag_lifts={str(k): float(v) for k, v in data["flag_lifts"].items()},
            flag_calibration={str(k): (float(a), float(b)) for k, (a, b) in data["flag_calibration"].items()},
        )


def expected_rating(distribution: Sequence[float]) -> float:
    """Expected digit (1..9) under a 9-way distribution."""
    if len(distribution) != 9:
        raise ValueError(f"a rating distribution has 9 entries (digits 1..9), got {len(distribution)}")
    return float(sum((digit + 1) * p for digit, p in enumerate(distribution)))


def make_score(
    distribution: Sequence[float], flags: Mapping[str, float], rule: CombinationRule | None = None
) -> ComplexityScore:
    """Build a caption score from the LLM's digit distribution and raw flag probabilities."""
    rule = rule or CombinationRule()
    rating = expected_rating(distribution)
    return ComplexityScore(
        score=rule.combine(rating, flags),
        rating=rating,
        distribution=[float(p) for p in distribution],
        flags=rule.calibrate_flags(flags),
        raw_flags={name: float(p) for name, p in flags.items()},
        source=SOURCE_CAPTION_LLM,
    )


@dataclass(frozen=True)
class PromptParts:
    """The rendered prompt split around the caption.

    Args:
        prefix: text before the caption, identical for every caption (its KV cache is shared).
        caption_suffix: text right after the caption (end of the user turn, assistant header),
            shared by all queries of a caption.
        answer_keys: query name -> its answer key (``complexity:``, ``text:``, ...); the model's
            next token after it is the answer.
    """

    prefix: str
    caption_suffix: str
    answer_keys: dict[str, str]

    def full_text(self, caption: str, query: str) -> str:
        return self.prefix + caption + self.caption_suffix + self.answer_keys[query]


def build_prompt_parts(tokenizer=None) -> PromptParts:
    """Render the prompt with the tokenizer's chat template (when it has one) and split it.

    Every turn is ``user: "Caption: <caption>"`` / ``assistant: "<key> <answer>"``; the last user
    turn holds the caption slot and is followed by the assistant header, then each query's key.
    Without a chat template a plain "User:/Assistant:" layout is used.
    """
    messages = []
    for caption, query, answer in FEW_SHOT:
        messages += [
            {"role": "user", "content": f"Caption: {caption}"},
            {"role": "assistant", "content": f"{QUERIES[query]} {answer}"},
        ]
    messages.append({"role": "user", "content": f"Caption: {_CAPTION_SLOT}"})
    messages[0]["content"] = INSTRUCTION + "\n\n" + messages[0]["content"]
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
        rendered = "\n".join(turns) + "\nAssistant: "
    if rendered.count(_CAPTION_SLOT) != 1:
        raise ValueError("the chat template must render the user message exactly once")
    prefix, caption_suffix = rendered.split(_CAPTION_SLOT)
    return PromptParts(prefix=prefix, caption_suffix=caption_suffix, answer_keys=dict(QUERIES))


def answer_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Per word, the ids of its single-token spellings ("w", " w", "W", " W").

    Raises if a word has no single-token spelling or two words share a token.
    """
    seen: dict[int, str] = {}
    result = []
    for word in words:
        ids = []
        for variant in dict.fromkeys([word, " " + word, word.capitalize(), " " + word.capitalize()]):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                if encoded[0] in seen and seen[encoded[0]] != word:
                    raise ValueError(f"answers {word!r} and {seen[encoded[0]]!r} share token {encoded[0]}")
                seen[encoded[0]] = word
                ids.append(encoded[0])
        if not ids:
            raise ValueError(
                f"the tokenizer has no single token for the answer {word!r}: cannot read its probability"
            )
        result.append(ids)
    return result


class PromptTokens:
    """The prompt as token ids, tokenized segment by segment so every backend feeds the same ids.

    Attributes:
        parts: the rendered :class:`PromptParts`.
        prefix_ids / suffix_ids: ids of the shared prefix and of the caption suffix.
        queries: query names, rating first, then :data:`FLAG_QUERIES`.
        key_ids: per query, ids of its answer key.
        digit_ids: per digit 1..9, ids of its single-token spellings.
        flag_ids: per flag, [ids of the "yes" answer's spellings, ids of the "no" answer's] (ANSWERS).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parts = build_prompt_parts(tokenizer)
        self.queries = (RATING_QUERY, *FLAG_QUERIES)
        self.prefix_ids = self.encode(self.parts.prefix)
        self.suffix_ids = self.encode(self.parts.caption_suffix)
        self.digit_ids = answer_token_ids(tokenizer, ANSWERS[RATING_QUERY])
        self.flag_ids = {flag: answer_token_ids(tokenizer, ANSWERS[flag]) for flag in FLAG_QUERIES}
        self.key_ids = [self.encode(self.answer_key(q)) for q in self.queries]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def answer_key(self, query: str) -> str:
        """The key text, plus a trailing space when this tokenizer has no single-token " answer".

        Qwen and Llama-3 split digits from the space before them: after "complexity:" the model
        first writes a space token, so reading digits there would ask about an unlikely event.
        Then the key ends with the space. GPT-2-style tokenizers have " 5" as one token; then the
        key stays as it is and the " 5" spellings are read.
        """
        key = self.parts.answer_keys[query]
        if not key or key[-1].isspace():
            return key
        spaced = [self.encode(" " + word) for word in ANSWERS[query]]
        return key if all(len(ids) == 1 for ids in spaced) else key + " "

    def answer_ids(self, query: str) -> list[list[int]]:
        return self.digit_ids if query == RATING_QUERY else self.flag_ids[query]

    def full_prompt_ids(self, caption: str, query: str) -> list[int]:
        """Token ids of the complete prompt for one (caption, query), as one sequence."""
        return (
            self.prefix_ids + self.encode(caption) + self.suffix_ids + self.key_ids[self.queries.index(query)]
        )


def cleaned_captions(captions: list[str]) -> list[str]:
    """The captions a scorer reads (:func:`clean_caption`), or an error naming the first bad one."""
    if isinstance(captions, str):
        raise TypeError("score() takes a list of captions, not a single string")
    cleaned = []
    for index, caption in enumerate(captions):
        text = clean_caption(caption) if isinstance(caption, str) else None
        if text is None:
            raise ValueError(
                f"caption {index} is empty or not a string ({caption!r}); use "
                "router.image_complexity_score(image) for images without a caption"
            )
        cleaned.append(text)
    return cleaned


class ComplexityScorer(abc.ABC):
    """Scores captions. Implementations: transformers (default) and vLLM backends, cache wrapper.

    Attributes:
        model_id: names the model (with :data:`PROMPT_VERSION` and :attr:`numerics`, the cache key).
        rule: the :class:`CombinationRule` applied to every score.
        numerics: backend and dtype the model computes in (e.g. ``"transformers:torch.float32"``):
            bf16 and fp32 scores of one caption differ by up to ~0.3, enough to change a route, so
            the score cache never hands one's scores to the other.
    """

    model_id: str = "unknown"
    rule: CombinationRule
    numerics: str = "unknown"

    @abc.abstractmethod
    def score_raw(self, captions: list[str]) -> list[tuple[list[float], dict[str, float]]]:
        """Run the model: per caption, the 9-way digit distribution and flag P(yes)."""

    def score(self, captions: list[str]) -> list[ComplexityScore]:
        """Score captions (any number; batching is the backend's business)."""
        raw = self.score_raw(cleaned_captions(captions))
        return [make_score(dist, flags, self.rule) for dist, flags in raw]
