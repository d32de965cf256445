"""The PEFT method's names and the ``PeftType`` member it needs: a leaf that config, model and registration share.

Importing this module imports nothing from PEFT.
"""

from __future__ import annotations

import enum

PEFT_METHOD = "spallm"
PREFIX = "spallm_"


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to an existing ``str`` Enum, in place; return the (new or existing) member.

    PEFT's ``register_peft_method`` only accepts names already listed in its closed ``PeftType``
    enum (PEFT 0.20 and 0.21), so an out-of-tree method has to add its member at runtime. The member
    behaves like a declared one: attribute and item lookup, lookup by value, iteration, equality
    with its string value, JSON serialisation.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}")
        return existing
    if value in enum_cls._value2member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member with value {value!r}")
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_sort_order_") or any(hasattr(m, "_sort_order_") for m in enum_cls):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses new member-like names
    return member


def spallm_peft_type() -> enum.Enum:
    """``PeftType.SPALLM`` (added to PEFT's closed enum on first use)."""
    from peft.utils.peft_types import PeftType

    return add_enum_member(PeftType, PEFT_METHOD.upper(), PEFT_METHOD.upper())
