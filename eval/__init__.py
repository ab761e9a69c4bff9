"""eval: reconstruction, router-quality and speed benchmarks for cat-tokenizer (`cat-bench`).

Modules: ``metrics`` (PSNR, SSIM, rFID, LPIPS, deep-feature distance), ``datasets`` (hub and local
sources under one fixed crop protocol), ``engine`` (one cached pass per image), ``recon``,
``router_quality`` and ``speed`` (the three benchmarks), ``report`` (results.json, report.md,
plots) and ``cli`` (the ``cat-bench`` command).
"""
