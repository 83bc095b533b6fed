"""At resume, a stored object whose stage fields are the template's skips their validation.

`codec._same_fields` compares plain values directly, type and value. It may
say "not the same" where the comparison of JSON values it shortcuts
(`codec._template_fields`) would not (``1`` and ``true``): that only runs a
validation. It must never say "the same" where that comparison would not.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field, computed_field

from checkmate import BaseStage, BaseStageState, codec


class Note(BaseStageState[Any]):
    pass


class Plain(BaseStage[Note]):
    label: str = "a"
    count: int = 1
    ratio: float = 1.0
    flag: bool = True
    maybe: str | None = None

    def execute_stage(self, previous_state_copy: Note) -> None:
        del previous_state_copy


class Nested(Plain):
    tags: list[str] = Field(default_factory=lambda: ["x"])


class Computed(Plain):
    @computed_field  # type: ignore[prop-decorator]
    @property
    def twice(self) -> int:
        return 2 * self.count


def _slow(template: BaseStage[Any], fields: dict[str, Any]) -> bool:
    known = codec._template_fields(template)
    return {k: v for k, v in fields.items() if k in known} == known


def _stored(template: BaseStage[Any]) -> dict[str, Any]:
    """The stage fields of an object written from ``template``, as JSON parses them."""
    return dict(codec._template_fields(template))


scalars = st.one_of(
    st.text(max_size=5),
    st.integers(-3, 3),
    st.floats(allow_nan=False, width=32),
    st.booleans(),
    st.none(),
)


@pytest.mark.parametrize("cls", [Plain, Nested, Computed])
@given(key=st.sampled_from(["label", "count", "ratio", "flag", "maybe", "other"]), value=scalars)
def test_the_shortcut_never_skips_a_validation_the_json_comparison_would_run(
    cls: type[Plain], key: str, value: object
) -> None:
    template = cls(stage_name="s", state=Note())
    fields = _stored(template)
    assert codec._same_fields(template, fields)
    original = fields.get(key)
    fields[key] = value
    same = codec._same_fields(template, fields)
    if same:
        assert _slow(template, fields)
    if key == "other" or type(value) is type(original):
        assert same == _slow(template, fields)


@pytest.mark.parametrize(
    ("key", "value"),
    [("count", True), ("count", 1.0), ("flag", 1), ("ratio", 1), ("maybe", "")],
)
def test_equal_values_of_another_json_type_are_not_the_same(key: str, value: object) -> None:
    template = Plain(stage_name="s", state=Note())
    fields = _stored(template)
    fields[key] = value
    assert not codec._same_fields(template, fields)


def test_a_missing_field_is_not_the_same_and_an_unknown_one_is_ignored() -> None:
    template = Plain(stage_name="s", state=Note())
    fields = _stored(template)
    assert codec._same_fields(template, {**fields, "retired": 3})
    del fields["count"]
    assert not codec._same_fields(template, fields)
