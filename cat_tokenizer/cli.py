"""``cat-tokenize``: tokenize a folder of images adaptively (and ``cat-tokenize decode`` them back).

```
cat-tokenize --images DIR [--captions captions.jsonl] --out OUT [--ratio auto|8|16|32] ...
cat-tokenize --shards 'in/{00000..00099}.tar' --out OUT [--format safetensors|webdataset] ...
cat-tokenize --hf-dataset ID_OR_PATH --split train --image-column image --caption-column caption --out OUT
cat-tokenize decode --tokens OUT --out recon/
```

captions.jsonl: one JSON object per line with the image path relative to DIR under ``image``
(or ``file_name`` / ``path``) and the caption under ``caption`` (or ``text``); see
:mod:`cat_tokenizer.captions` and :mod:`cat_tokenizer.jobs` for every rule. Output layout and
the kill-safety guarantees: :mod:`cat_tokenizer.store`.

Exit codes (the convention of every command, :mod:`cat_foundations.cli`): 0 every image was
tokenized; 2 the run finished but some images or caption lines failed (see errors.jsonl); 1 fatal
error (bad arguments, unreadable input, unwritable output, model that cannot load), reported as
one line on stderr (set ``CAT_TOKENIZER_DEBUG=1``, or the older ``CAT_TOKENIZE_DEBUG=1``, for the
traceback).

Scale-out: run the same command under ``accelerate launch`` (multi-GPU, multi-node); the image
list (or, with ``--shards`` / ``--hf-dataset``, the list of input shards:
:mod:`~cat_tokenizer.cli_shards`) is split with ``PartialState.split_between_processes``, each
rank writes its own shards and rank 0 merges the manifest.

Files: :mod:`~cat_tokenizer.cli_args` (parsers -> typed settings, :mod:`~cat_tokenizer.cli_settings`),
:mod:`~cat_tokenizer.cli_tokenize` (orchestration), :mod:`~cat_tokenizer.cli_summary`,
:mod:`~cat_tokenizer.cli_decode`; this module is the entry point only. ``--router-backend vllm`` scores every caption of a process in one
vLLM pass before encoding starts.
"""

from __future__ import annotations

import sys

from cat_foundations.cli import run_cli
from cat_tokenizer.cli_args import decode_parser, parse_decode, parse_tokenize, tokenize_parser
from cat_tokenizer.cli_decode import run_decode
from cat_tokenizer.cli_shards import run_sharded
from cat_tokenizer.cli_summary import format_summary, summarize
from cat_tokenizer.cli_tokenize import run_tokenize

__all__ = ["decode_parser", "format_summary", "main", "summarize", "tokenize_parser"]

INTERRUPTED = "interrupted (finished shards are kept; rerun with --resume)"


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "decode":
        return run_decode(parse_decode(argv[1:]))
    if argv and argv[0] == "tokenize":
        argv = argv[1:]
    settings = parse_tokenize(argv)
    return run_sharded(settings) if settings.sharded else run_tokenize(settings)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 some items failed, 1 fatal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli("cat-tokenize", lambda: _dispatch(argv), interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
