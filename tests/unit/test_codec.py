"""Step and run values: JSON on the wire, plain data back unless a type is asked for."""

from __future__ import annotations

import dataclasses

import msgspec
import pydantic
import pytest

from meshflow.codec import decode_value, encode_value
from meshflow.errors import SerializationError


class Account(pydantic.BaseModel):
    id: str
    plan: str = "free"


class AccountStruct(msgspec.Struct):
    id: str
    plan: str = "free"


@dataclasses.dataclass
class AccountDC:
    id: str
    plan: str = "free"


@pytest.mark.parametrize("value", [Account(id="a1"), AccountStruct(id="a1"), AccountDC(id="a1")])
def test_models_are_stored_as_json_and_come_back_as_plain_data(value: object) -> None:
    raw = encode_value(value, what="step 'create'")
    assert decode_value(raw) == {"id": "a1", "plan": "free"}


def test_a_pydantic_model_comes_back_as_the_model_when_asked_for() -> None:
    raw = encode_value(Account(id="a1", plan="pro"), what="step 'create'")
    assert decode_value(raw, Account) == Account(id="a1", plan="pro")
    assert decode_value(raw, AccountStruct) == AccountStruct(id="a1", plan="pro")


def test_a_value_that_is_not_json_names_the_step() -> None:
    with pytest.raises(SerializationError, match="step 'create'"):
        encode_value({"lock": object()}, what="step 'create'")
