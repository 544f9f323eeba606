"""fast_init: the same construction as a frozen dataclass's own __init__, only faster."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import FrozenInstanceError, dataclass, field, replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core import domain
from engine.core.frozen import fast_init
from engine.dryrun import Candidate
from engine.evaluate import Evaluation
from engine.planner_rows import Pending, PlannedRow
from engine.store.codec import PatientData, PatientRecord

AT = datetime(2026, 12, 2, tzinfo=UTC)


@dataclass(frozen=True)
class Plain:
    a: int
    b: str = "b"
    c: tuple[int, ...] = ()
    d: dict[str, int] = field(default_factory=dict)


@fast_init
@dataclass(frozen=True)
class Fast:
    a: int
    b: str = "b"
    c: tuple[int, ...] = ()
    d: dict[str, int] = field(default_factory=dict)


def _decorated() -> list[type]:
    found = [
        cls
        for cls in vars(domain).values()
        if isinstance(cls, type) and cls.__module__ == domain.__name__
        if dataclasses.is_dataclass(cls) and cls.__init__.__qualname__.startswith(cls.__qualname__)
    ]
    return [*found, Candidate, Evaluation, Pending, PlannedRow, PatientData, PatientRecord]


@pytest.mark.parametrize("cls", _decorated(), ids=lambda c: c.__name__)
def test_the_signature_is_the_dataclass_fields_in_order_with_their_defaults(cls: type) -> None:
    assert cls.__init__.__module__ == cls.__module__  # fast_init's, not the generated one
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default is f.default
        elif f.default_factory is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty


@given(
    a=st.integers(),
    b=st.text(max_size=5),
    c=st.lists(st.integers(), max_size=3).map(tuple),
    d=st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    how=st.sampled_from(["positional", "keyword", "defaults"]),
)
def test_construction_matches_the_dataclass_init(a, b, c, d, how) -> None:  # type: ignore[no-untyped-def]
    if how == "positional":
        fast, plain = Fast(a, b, c, d), Plain(a, b, c, d)
    elif how == "keyword":
        fast, plain = Fast(d=d, c=c, b=b, a=a), Plain(d=d, c=c, b=b, a=a)
    else:
        fast, plain = Fast(a), Plain(a)
    assert vars(fast) == vars(plain)
    assert list(vars(fast)) == list(vars(plain))  # same order: same repr and astuple
    assert repr(fast).removeprefix("Fast") == repr(plain).removeprefix("Plain")


def test_the_instance_stays_frozen_hashable_replaceable_and_picklable() -> None:
    one = Fast(1, "x", (2,))
    assert one == Fast(1, "x", (2,)) and one != Fast(2)
    with pytest.raises(FrozenInstanceError):
        one.a = 2  # type: ignore[misc]
    assert replace(one, b="y") == Fast(1, "y", (2,))
    assert pickle.loads(pickle.dumps(one)) == one
    assert hash(domain.SentMessage(AT, "care")) == hash(domain.SentMessage(AT, "care"))


def test_a_default_factory_gives_each_instance_its_own_value() -> None:
    first, second = Fast(1), Fast(2)
    assert first.d == {} and first.d is not second.d
    assert domain.Patient("a").attributes is not domain.Patient("b").attributes


def test_missing_and_unknown_arguments_are_refused_as_by_the_dataclass() -> None:
    with pytest.raises(TypeError):
        Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, e=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, a=2)  # type: ignore[misc]


def test_classes_it_cannot_reproduce_are_refused() -> None:
    @dataclass
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True)
    class KeywordOnly:
        a: int = field(kw_only=True)

    @dataclass(frozen=True)
    class NotInInit:
        a: int = field(init=False, default=1)

    @dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    for cls in (Mutable, PostInit, KeywordOnly, NotInInit, Slotted):
        with pytest.raises(TypeError):
            fast_init(cls)
