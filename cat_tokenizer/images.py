"""Re-export of :mod:`cat_foundations.images` (the public ``cat_tokenizer.images`` path stays)."""

from cat_foundations.images import (  # noqa: F401
    WHITE,
    ImageLoadError,
    center_crop_resize,
    limit_max_side,
    load_image,
    pil_to_tensor,
    tensor_to_pil,
    to_rgb,
)
