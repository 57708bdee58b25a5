"""wfaas.params without processes: each annotation the CLI can check, what it accepts and what it refuses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from wfaas.params import ParamError, build_fields, type_name


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass
class P:
    count: int = 0
    ratio: float = 0.0
    name: str = ""
    maybe: str | None = None
    flag: bool = False
    mode: Mode = Mode.FAST
    pick: Literal["a", "b"] = "a"
    when: datetime | None = None
    day: date | None = None
    path: Path | None = None
    ids: set[int] = field(default_factory=set)
    by_id: dict[int, str] = field(default_factory=dict)
    anything: Any = None
    hidden: int = field(default=0, init=False)


@pytest.mark.parametrize(
    ("data", "params", "expected"),
    [
        ({"ratio": 3}, [], {"ratio": 3.0}),
        ({"mode": "SAFE"}, [], {"mode": Mode.SAFE}),
        ({"ids": [1, 2, 2]}, [], {"ids": {1, 2}}),
        ({"by_id": {"7": "x"}}, [], {"by_id": {7: "x"}}),
        ({"anything": [1, "x"]}, [], {"anything": [1, "x"]}),
        ({}, ["maybe=null"], {"maybe": "null"}),  # a str field keeps what was typed
        ({}, ["flag=yes", "count=-3", "pick=b"], {"flag": True, "count": -3, "pick": "b"}),
        ({}, ["path=/tmp/a b", "day=2026-01-31"], {"path": Path("/tmp/a b"), "day": date(2026, 1, 31)}),
        ({"count": 1}, ["count=2"], {"count": 2}),
    ],
)
def test_values_are_converted_to_the_annotation(
    data: dict[str, Any], params: list[str], expected: dict[str, Any]
) -> None:
    assert build_fields(P, data, params) == expected


@pytest.mark.parametrize(
    ("data", "params", "message"),
    [
        ({"count": True}, [], "--data: field 'count' of P expects int, got true"),
        ({"pick": "c"}, [], 'field \'pick\' of P expects "a" | "b", got "c"'),
        ({"ids": ["x"]}, [], "field 'ids[0]' of P expects int"),
        ({"hidden": 1}, [], "P has no field 'hidden'"),
        ({}, ["flag=maybe"], "--param: field 'flag' of P expects bool, got \"maybe\""),
        ({}, ["when=now"], "expects datetime | None (an ISO 8601 string, e.g. 2026-01-31T09:30:00)"),
        ({}, ["=3"], "write it as FIELD=VALUE"),
    ],
)
def test_mismatches_name_field_type_and_value(data: dict[str, Any], params: list[str], message: str) -> None:
    with pytest.raises(ParamError) as info:
        build_fields(P, data, params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_type_names_read_as_written() -> None:
    assert type_name(list[int]) == "list[int]"
    assert type_name(int | None) == "int | None"
    assert type_name(tuple[int, ...]) == "tuple[int, ...]"
    assert type_name(dict[str, list[float]]) == "dict[str, list[float]]"
