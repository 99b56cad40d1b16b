"""The LD3M generator (DDIM + skip + VQ decoder) and its memory-efficient backward schemes."""

from ld3m.generator.backward import choose_scheme, generate_and_backward, resolve_scheme
from ld3m.generator.ldm import (
    LD3MGenerator,
    class_context,
    draw_noise,
    encode_images,
    init_latents,
)

__all__ = [
    "LD3MGenerator",
    "choose_scheme",
    "class_context",
    "draw_noise",
    "encode_images",
    "generate_and_backward",
    "init_latents",
    "resolve_scheme",
]
