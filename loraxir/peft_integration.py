"""Registration of loraxir as a peft method, done once peft is imported (see
:mod:`loraxir._peft_hook`, which calls :func:`register_with_peft`).

peft's ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so we
write a plain-string type into peft's mapping tables; peft's code paths accept string
types. After ``import loraxir``: ``peft.get_peft_model(backbone, LoraIRConfig(...))``,
``save_pretrained`` and ``peft.PeftModel.from_pretrained(backbone, folder)`` work.
"""

from __future__ import annotations

from peft import mapping

from loraxir.config import PEFT_TYPE, LoraIRConfig
from loraxir.model import LoraIRModel


def register_with_peft() -> None:
    """Write loraxir's config, tuner and parameter prefix into peft's tables (idempotent)."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LoraIRConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = LoraIRModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = LoraIRModel.prefix
