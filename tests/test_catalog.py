from typing import ClassVar

import pytest
from pydantic import BaseModel, ValidationInfo, field_validator

from harden.attacks import ATTACKS
from harden.catalog import Catalog, catalog_of
from harden.data import DATASETS
from harden.model_load import check_timm_name
from harden.objectives import OBJECTIVES


class Seen(BaseModel):
    """Records the catalog its validation got."""

    x: int = 0
    seen: ClassVar[list[Catalog]] = []

    @field_validator("x")
    @classmethod
    def _record(cls, x: int, info: ValidationInfo) -> int:
        cls.seen.append(catalog_of(info))
        return x


def test_complete_only_with_every_lookup():
    full = Catalog(objectives=OBJECTIVES, attacks=ATTACKS, datasets=DATASETS, check_model=check_timm_name)
    assert full.complete
    assert not Catalog().complete
    assert not Catalog(objectives=OBJECTIVES, attacks=ATTACKS, datasets=DATASETS).complete  # no model check


@pytest.mark.parametrize("context", [None, {}, {"harden": "not a catalog"}, {"other": Catalog(attacks=ATTACKS)}, [1]])
def test_without_a_catalog_in_the_context_an_empty_one_checks_structure_only(context):
    Seen.seen.clear()
    Seen.model_validate({"x": 1}, context=context)
    assert Seen.seen == [Catalog()] and not Seen.seen[0].complete


def test_the_catalog_handed_in_is_the_one_read_back():
    Seen.seen.clear()
    catalog = Catalog(attacks=ATTACKS)
    Seen.model_validate({"x": 1}, context={"harden": catalog})
    assert len(Seen.seen) == 1 and Seen.seen[0] is catalog


def test_a_catalog_is_frozen():
    with pytest.raises(AttributeError):
        Catalog().attacks = ATTACKS  # type: ignore[misc]
