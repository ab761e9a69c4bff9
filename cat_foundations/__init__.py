"""cat_foundations: the facts every cat-tokenizer package shares, in one place.

This is the bottom layer: it imports nothing from ``router``, ``nested_vae``, ``cat_tokenizer``
or ``eval``, and all of them may import it.

* :mod:`~cat_foundations.images`   any input -> 8-bit RGB PIL; PIL <-> ``[-1, 1]`` tensors; crops
* :mod:`~cat_foundations.captions` captions.jsonl reading and :func:`clean_caption`
* :mod:`~cat_foundations.ratios`   ``RATIOS == (8, 16, 32)``, padding, latent size, token count
* :mod:`~cat_foundations.atomic`   fsync'd atomic file writes (bytes, text, JSON, JSON lines)
* :mod:`~cat_foundations.cache`    the one cache root (``cache_root()``)
* :mod:`~cat_foundations.cli`      exit codes (0 all done, 2 partial, 1 fatal) and ``run_cli``
"""
