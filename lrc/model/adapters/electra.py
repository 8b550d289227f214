"""ELECTRA: BERT's blocks without a pooler; the generator's and discriminator's heads are left out."""

from dataclasses import replace

from . import register
from .bert import BERT

ELECTRA = register(replace(BERT, model_types=("electra",), optional_parts=(),
                           unused_heads=(*BERT.unused_heads, "generator_", "discriminator_")))
