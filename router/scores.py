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
``text:``, ...). The model's next token after the key is the answer, read from next-token
probabilities: digits ``1``..``9`` for the rating, ``yes``/``no`` for the flags.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Bump whenever INSTRUCTION, QUERIES or the layout changes: cached scores are keyed by it.
PROMPT_VERSION = "cat-router-v1"

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
    "Each message gives a caption and one question about the image; answer only with the digit "
    "or with yes or no."
)

# Query name -> question asked after the caption. "complexity" is the rating (answer: one digit);
# the others are the perception flags (answer: yes/no, reported as P(yes)).
RATING_QUERY = "complexity"
FLAG_QUERIES = ("text", "faces", "charts")
QUERIES = {
    RATING_QUERY: "Visual complexity from 1 to 9? Answer with one digit.",
    "text": "Does the image contain readable text? Answer yes or no.",
    "faces": "Does the image show a human face? Answer yes or no.",
    "charts": "Is it a chart, diagram or drawing with fine lines? Answer yes or no.",
}

# Worked examples shown before every caption (invented, none from the devset). They sit in the
# shared prefix, so they cost nothing per caption. They anchor the 1-9 scale (faces and text need
# fine detail) and teach a 0.5B model to answer the yes/no questions from the caption instead of
# answering "no" to everything.
FEW_SHOT = (
    ("A plain white wall.", RATING_QUERY, "1"),
    ("A portrait photo of a smiling man with a grey beard.", "faces", "yes"),
    ("A street sign on a pole reading MAIN STREET.", "text", "yes"),
    ("A flat icon of a house in two colours.", RATING_QUERY, "2"),
    ("A red apple on a wooden table.", "faces", "no"),
    ("A line chart of monthly sales with labelled axes and a legend.", "charts", "yes"),
    ("A dog running on a beach under a clear sky.", RATING_QUERY, "5"),
    ("A green meadow with a few trees under a cloudy sky.", "text", "no"),
    ("A close-up of an old woman's face with wrinkles and grey hair.", RATING_QUERY, "7"),
    ("A cartoon cat chasing a ball of yarn.", "charts", "no"),
    ("A screenshot of a settings menu with many small labels.", "text", "yes"),
    ("Two children laughing at a birthday party.", "faces", "yes"),
    ("A flow diagram of boxes connected by arrows with small captions.", RATING_QUERY, "8"),
    ("A mountain lake at sunset.", "faces", "no"),
    ("A cartoon sun with a smiling face, drawn with thick outlines.", "text", "no"),
    ("A scatter plot of two clusters of points with a legend.", "charts", "yes"),
    ("A page of a printed book with two columns of small text.", RATING_QUERY, "9"),
    ("A close-up portrait of a woman in a red scarf.", "charts", "no"),
)

# Stand-ins used to find where the caption and the question go in the rendered chat template.
_CAPTION_SLOT = "\u2063CAPTION\u2063"
_QUESTION_SLOT = "\u2063QUESTION\u2063"


@dataclass
class ComplexityScore:
    """Visual complexity of one image, predicted from its caption (or its pixels as a fallback).

    Args:
        score: final score in [1, 9] after :class:`CombinationRule` (what routing uses).
        rating: expected value of the LLM's 1-9 digit, in [1, 9].
        distribution: the LLM's probabilities of the digits 1..9 (nine floats summing to 1).
        flags: perception flag name -> P(yes) in [0, 1] (``text``, ``faces``, ``charts``).
        source: what decided the score: ``"caption_llm"`` or ``"image_jpeg_bpp"``.
    """

    score: float
    rating: float
    distribution: list[float] = field(default_factory=list)
    flags: dict[str, float] = field(default_factory=dict)
    source: str = SOURCE_CAPTION_LLM

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "rating": self.rating,
            "distribution": list(self.distribution),
            "flags": dict(self.flags),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ComplexityScore:
        return cls(
            score=float(data["score"]),
            rating=float(data["rating"]),
            distribution=[float(p) for p in data.get("distribution", [])],
            flags={str(k): float(v) for k, v in data.get("flags", {}).items()},
            source=str(data.get("source", SOURCE_CAPTION_LLM)),
        )


@dataclass
class CombinationRule:
    """How the LLM rating and the perception flags combine into the final score.

    ``score = clip(rating + sum_f flag_lifts[f] * P_f(yes), 1, 9)``

    Why additive lifts: the rating alone under-rates captions that mention things human perception
    is sensitive to (small text, faces, thin chart lines), which need the finer ratios even when the
    scene is otherwise simple. A lift is the number of score points a certain "yes" adds. Set a lift
    to 0 to ignore that flag, or all to 0 to use the raw rating.

    Args:
        flag_lifts: flag name -> score points added at P(yes) = 1. Defaults are a prior (text is
            the most loss-sensitive content, then faces and thin chart lines), not fitted: with the
            default 0.5B model the flags separate domains only weakly (see router/README.md).
    """

    flag_lifts: dict[str, float] = field(default_factory=lambda: {"text": 1.5, "faces": 1.0, "charts": 1.0})

    def combine(self, rating: float, flags: Mapping[str, float]) -> float:
        lifted = rating + sum(lift * flags.get(name, 0.0) for name, lift in self.flag_lifts.items())
        return min(9.0, max(1.0, lifted))


def expected_rating(distribution: Sequence[float]) -> float:
    """Expected digit (1..9) under a 9-way distribution."""
    if len(distribution) != 9:
        raise ValueError(f"a rating distribution has 9 entries (digits 1..9), got {len(distribution)}")
    return float(sum((digit + 1) * p for digit, p in enumerate(distribution)))


def softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def make_score(
    distribution: Sequence[float], flags: Mapping[str, float], rule: CombinationRule | None = None
) -> ComplexityScore:
    """Build a caption score from the LLM's digit distribution and flag probabilities."""
    rule = rule or CombinationRule()
    rating = expected_rating(distribution)
    return ComplexityScore(
        score=rule.combine(rating, flags),
        rating=rating,
        distribution=[float(p) for p in distribution],
        flags={name: float(p) for name, p in flags.items()},
        source=SOURCE_CAPTION_LLM,
    )


@dataclass(frozen=True)
class PromptParts:
    """The rendered prompt split around the caption.

    Args:
        prefix: text before the caption, identical for every caption (its KV cache is shared).
        caption_suffix: text right after the caption, shared by all queries of a caption.
        answer_keys: query name -> the rest of the prompt for that query (its question, the end
            of the user turn and the assistant header); the model's next token is the answer.
    """

    prefix: str
    caption_suffix: str
    answer_keys: dict[str, str]

    def full_text(self, caption: str, query: str) -> str:
        return self.prefix + caption + self.caption_suffix + self.answer_keys[query]


def clean_caption(caption: str) -> str:
    """Collapse whitespace so a caption cannot break the prompt layout (and caches match)."""
    return " ".join(str(caption).split())


def build_prompt_parts(tokenizer=None) -> PromptParts:
    """Render the prompt with the tokenizer's chat template (when it has one) and split it.

    Without a chat template a plain "User:/Assistant:" layout is used.
    """
    def ask(caption: str, question: str) -> str:
        return f"Caption: {caption}\n{question}"

    messages = []
    for caption, query, answer in FEW_SHOT:
        messages += [{"role": "user", "content": ask(caption, QUERIES[query])}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": ask(_CAPTION_SLOT, _QUESTION_SLOT)})
    messages[0]["content"] = INSTRUCTION + "\n\n" + messages[0]["content"]
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
        rendered = "\n".join(turns) + "\nAssistant:"
    if rendered.count(_CAPTION_SLOT) != 1 or rendered.count(_QUESTION_SLOT) != 1:
        raise ValueError("the chat template must render the user message exactly once")
    prefix, rest = rendered.split(_CAPTION_SLOT)
    caption_suffix, after_question = rest.split(_QUESTION_SLOT)
    keys = {query: question + after_question for query, question in QUERIES.items()}
    return PromptParts(prefix=prefix, caption_suffix=caption_suffix, answer_keys=keys)


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
            raise ValueError(f"the tokenizer has no single token for the answer {word!r}: cannot read its probability")
        result.append(ids)
    return result


class PromptTokens:
    """The prompt as token ids, tokenized segment by segment so every backend feeds the same ids.

    Attributes:
        parts: the rendered :class:`PromptParts`.
        prefix_ids / suffix_ids: ids of the shared prefix and of the caption suffix.
        queries: query names, rating first, then :data:`FLAG_QUERIES`.
        key_ids: per query, ids of its answer key.
        digit_ids / yes_no_ids: per answer, ids of its single-token spellings.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parts = build_prompt_parts(tokenizer)
        self.queries = (RATING_QUERY, *FLAG_QUERIES)
        self.prefix_ids = self.encode(self.parts.prefix)
        self.suffix_ids = self.encode(self.parts.caption_suffix)
        self.digit_ids = answer_token_ids(tokenizer, DIGITS)
        self.yes_no_ids = answer_token_ids(tokenizer, YES_NO)
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
        spaced = [self.encode(" " + word) for word in (DIGITS if query == RATING_QUERY else YES_NO)]
        return key if all(len(ids) == 1 for ids in spaced) else key + " "

    def answer_ids(self, query: str) -> list[list[int]]:
        return self.digit_ids if query == RATING_QUERY else self.yes_no_ids

    def full_prompt_ids(self, caption: str, query: str) -> list[int]:
        """Token ids of the complete prompt for one (caption, query), as one sequence."""
        return self.prefix_ids + self.encode(caption) + self.suffix_ids + self.key_ids[self.queries.index(query)]


class ComplexityScorer(abc.ABC):
    """Scores captions. Implementations: transformers (default) and vLLM backends, cache wrapper.

    Attributes:
        model_id: names the model (and so, with :data:`PROMPT_VERSION`, the cache key).
        rule: the :class:`CombinationRule` applied to every score.
    """

    model_id: str = "unknown"
    rule: CombinationRule

    @abc.abstractmethod
    def score_raw(self, captions: list[str]) -> list[tuple[list[float], dict[str, float]]]:
        """Run the model: per caption, the 9-way digit distribution and flag P(yes)."""

    def score(self, captions: list[str]) -> list[ComplexityScore]:
        """Score captions (any number; batching is the backend's business)."""
        if isinstance(captions, str):
            raise TypeError("score() takes a list of captions, not a single string")
        for index, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"caption {index} is empty or not a string ({caption!r}); use "
                    "router.image_complexity_score(image) for images without a caption"
                )
        raw = self.score_raw([clean_caption(c) for c in captions])
        return [make_score(dist, flags, self.rule) for dist, flags in raw]
