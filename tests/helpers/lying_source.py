"""A weight source that lies: its metadata is the honest source's, but its iteration yields one
tensor cut short. The trainer's check of each streamed tensor against the manifest must refuse the
round, naming the tensor, before any of its bytes land on a receiver."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Lying:
    """`source` (anything with `metadata()` and iteration: weightsync's or vLLM's ModuleSource),
    except that the tensor at `index` is yielded as `cut(tensor)`."""

    def __init__(self, source, index: int, cut: Callable[[torch.Tensor], torch.Tensor]):
        self.source, self.index, self.cut = source, index, cut

    def metadata(self):
        return self.source.metadata()

    def __iter__(self):
        for index, (name, tensor) in enumerate(self.source):
            yield name, self.cut(tensor) if index == self.index else tensor
