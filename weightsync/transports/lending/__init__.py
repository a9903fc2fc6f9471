"""The parts of the transports whose receivers read the trainer's lent GPU memory (ipc, p2p).

Each module has one job, so that a reader of one class knows what it may touch:

- `checksums`: what a round's checksum covers (`Coverage`: a sample or every byte), where the
  trainer's value meets the receivers' (`DigestBoard`, on the group's rendezvous store), and the
  trainer's background checksum (`DigestPublisher`).
- `header`: the wire format around `cuda_ipc`'s models: the trainer's `HandleExporter` (storages
  exported once, the update_info body rebuilt only when a placement changed) and the receiver's
  `HandleReader` and `ManifestReader` (validated once, versioned while they stay the same).
- `sender`: the trainer side (`IpcSender`): lending, bounded staging, batches, repeat rounds.
- `receiver`: the receiver side (`IpcReceiver`): opening handles, landing into a sink, verifying;
  how the bytes move is a `CopyStrategy` it composes (ipc's `LocalCopy`, p2p's `PeerCopy`).
- `transport`: `LendingTransport`, the `Transport` facade: it joins the group (agreement on the
  rendezvous store) and holds one sender (rank 0) or one receiver (every other rank).
"""
