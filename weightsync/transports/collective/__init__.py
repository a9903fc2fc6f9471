"""The broadcast round shared by every collective transport (gloo on CPU, NCCL on GPU).

One round, on every party:
  1. the trainer broadcasts a JSON `RoundHeader` (manifest, update kind, packing plan);
  2. every receiver checks it against its weights; the group all-gathers the verdicts and,
     if anyone objects, every party raises `ManifestMismatch` naming the parameter, before
     one payload byte reached any weights (the group stays usable for the next round). A
     transport may move its first chunk meanwhile, into the receivers' scratch memory, so
     that the agreement overlaps the transfer (see `RoundRules.lead_pieces`);
  3. the payload flows in bounded chunks, `num_buffers` of them in flight at once; the trainer
     folds what it packs into the stream checksum, each receiver what it landed;
  4. one all-gather carries every party's verdict and checksum: every party sees the same
     facts, so all of them reach the same outcome (applied everywhere, or failed everywhere
     with the reason), and the trainer learns it without a further step.

The parts, one job each:
  group         `Group`/`Pending` (the communicator) and `Party` (who this party is)
  agreement     the verdict exchange (`Agreement`, typed tickets, `Verdicts`)
  round_header  the header's encoding (`HeaderEncoder`, trainer) and decoding (`HeaderDecoder`)
  rules         what a header says about how its round moves (`RoundRules`)
  buffers       staging buffers and the chunking of a stream, reused from round to round
  paths         the data path interfaces (`SendPath`, `ReceivePath`) and the packed paths
  sender        `CollectiveSender`: the trainer's round
  receiver      `CollectiveReceiver`: a receiver's round
  transport     `CollectiveTransport`: the `Transport` facade holding one of the two
  trace         diagnosis (`TRACE`, `mark`)
A transport replaces only its `Group`, its `RoundRules` and its data paths; the control steps,
the checks and the commit rules live here once.
"""

from weightsync.transports.collective.agreement import Verdicts, agree_options_over_group
from weightsync.transports.collective.group import Group, Party, Pending
from weightsync.transports.collective.paths import ReceivePath, SendPath
from weightsync.transports.collective.round_header import LEAD_MAX_PIECES
from weightsync.transports.collective.rules import RoundRules
from weightsync.transports.collective.trace import mark
from weightsync.transports.collective.transport import CollectiveOptions, CollectiveTransport

__all__ = [
    "LEAD_MAX_PIECES", "CollectiveOptions", "CollectiveTransport", "Group", "Party", "Pending", "ReceivePath",
    "RoundRules", "SendPath", "Verdicts", "agree_options_over_group", "mark",
]
