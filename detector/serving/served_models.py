"""Which stored models this service serves: the live bank of every product (or the ones
named), and the one backbone most of them were fitted with; the others are refused by name."""

from __future__ import annotations

from collections import Counter

import bentoml

from detector.banks.models import (
    BACKBONE_MODEL,
    checked_spec,
    no_banks,
    split_by_backbone,
    stored,
)
from detector.banks.products import check_product, list_products, live_model
from detector.extractor import IncompatibleBankError


def resolve_models(
    products: list[str] | None = None,
    backbone_tag: str | None = None,
    runtime: str = "torch",
    precision: str = "f32",
) -> tuple[bentoml.Model, dict[str, bentoml.Model], dict[str, str]]:
    """(backbone, {product: live bank}, {product: why it is not served}) from the store:
    every product unless some are named. A product fitted with another backbone is refused
    by name and the others are served; only when none can be does the start stop.

    Reads metadata (and, for a graph runtime, the stored graph's stamp), never weights, so
    the service refuses a missing or mismatched set, an uninstalled runtime or a graph of
    other weights when it is imported, before any worker starts.
    """
    names = [check_product(name) for name in products] if products else list_products()
    if not names:
        raise no_banks()
    banks = {name: live_model(name) for name in names}
    # The backbone most products were fitted with (a demo product left beside real ones
    # must not decide), unless one is named.
    used = Counter(
        str(bank.info.metadata["backbone_model"])
        for bank in banks.values()
        if bank.info.metadata.get("backbone_model")
    )
    backbone = stored(backbone_tag or (used.most_common(1)[0][0] if used else BACKBONE_MODEL))
    served, refused = split_by_backbone(backbone, banks)
    if not served:
        raise IncompatibleBankError(next(iter(refused.values())))
    checked_spec(backbone, served, runtime, precision)
    return backbone, served, refused
