"""Errors that name what went wrong, so a caller can report the field or parameter."""


class WeightSyncError(Exception):
    """Base class of every weightsync error."""


class ProtocolError(WeightSyncError, ValueError):
    """A message failed validation; `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OptionMismatch(ProtocolError):
    """The parties of a group joined with different transport options (init_info.options): init
    fails on every party, naming the option and both values; no round ever runs on the group."""


class ManifestMismatch(WeightSyncError):
    """The trainer's manifest disagrees with a receiver's weights; nothing was written."""


class PhaseError(WeightSyncError):
    """A phase was called out of order (update before start, finish twice...)."""


class TransferError(WeightSyncError):
    """The transfer itself failed: a peer vanished, a collective timed out, bytes were lost.

    `weights_touched` says whether part of the failed round had already landed in the live
    weights (a non-atomic receiver): they then hold neither the old version nor the new one.
    """

    weights_touched: bool = False


class IntegrityError(TransferError):
    """The bytes received do not match the checksum the trainer computed: the round fails."""



class SourceMismatch(TransferError):
    """A trainer's weight source yielded something its metadata did not announce (name, order,
    count, dtype or shape): the round fails on every party, the message naming the parameter."""
