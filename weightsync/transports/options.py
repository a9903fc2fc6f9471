"""A transport's init options: every choice that changes what travels or how, as typed fields.

They arrive as `init_info.options` (plain JSON in the core's `InitInfo`) and each transport
validates them with its own model, a subclass of `TransportOptions` (`Transport.options_model`):
an unknown name or a wrong type fails init naming the field. Every party of a group must join
with the same values once defaults are filled in: the values travel in each party's join key on
the group's rendezvous store (or, for an nccl group formed from a trainer-minted id, over the
communicator) and a difference fails init on every party, naming the option and both values
(`weightsync.errors.OptionMismatch`). A mismatch can therefore never show up as a timeout or a
corrupted round later.

Environment variables may only set a field's default (`env_default`), for operators who cannot
change the init_info their trainer sends; an explicit value in init_info always wins, and the
defaults are agreed like any value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from weightsync.protocol import InitInfo, parse

T = TypeVar("T")
OptionsT = TypeVar("OptionsT", bound="TransportOptions")


class TransportOptions(BaseModel):
    """Base of every transport's options model (fields with documented defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls: type[OptionsT], init: InitInfo) -> OptionsT:
        """The options `init` names for this transport, defaults filled in; ProtocolError naming
        `init_info.options.<field>` when one is unknown or invalid."""
        return parse(cls, init.options, "init_info.options")

    def agreed(self) -> dict[str, Any]:
        """What every party compares at init: each option's JSON value."""
        return self.model_dump(mode="json")


def env_default(variable: str, parse_value: Callable[[str], T], default: T) -> Callable[[], T]:
    """A default factory: `parse_value($variable)` when the variable is set, else `default`.

    The only place weightsync reads a WEIGHTSYNC_* variable that concerns a transfer (a test
    holds it to that): the value becomes the default of an option, which is agreed at init."""

    def factory() -> T:
        raw = os.environ.get(variable)
        if raw is None or raw == "":
            return default
        try:
            return parse_value(raw)
        except ValueError as error:
            raise ValueError(f"${variable}={raw!r} is not a valid default: {error}") from None

    factory.__doc__ = f"${variable}, else {default!r}"
    return factory


def flag(raw: str) -> bool:
    """An environment flag: 1/true/yes/on or 0/false/no/off."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")
