"""Re-export of :mod:`cat_foundations.captions` (the public ``cat_tokenizer.captions`` path stays)."""

from cat_foundations.captions import (  # noqa: F401
    CAPTION_KEYS,
    IMAGE_KEYS,
    CaptionEntry,
    CaptionError,
    CaptionsFile,
    clean_caption,
    parse_caption_line,
    read_captions_jsonl,
)
