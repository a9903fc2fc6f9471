"""A trainer process for fault tests: joins the group, sends one round at full speed, then on
"go" (stdin) sends a second round slowly, printing each payload chunk so a test can kill it mid-way."""

import argparse
import json
import sys
import threading
import time

import torch

from weightsync import WeightSender


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.weight", torch.randn(128, 128, generator=gen)) for i in range(16)]


class Broadcasts:
    """How many broadcasts went out, for a test to wait on (an event with a deadline, not a sleep)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def went_out(self) -> int:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
            return self.count

    def wait_for(self, count: int, timeout: float) -> bool:
        """Whether `count` broadcasts went out within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


def slowed(group, delay: float) -> Broadcasts:
    """Wrap the group's broadcast: sleep before each one (so a test can act mid-round) and count
    (and print, for a test driving this as a process) how many went out."""
    original = group.broadcast
    broadcasts = Broadcasts()

    def broadcast(tensor, src=0):
        time.sleep(delay)
        print(json.dumps({"broadcasts": broadcasts.went_out()}), flush=True)
        return original(tensor, src)

    group.broadcast = broadcast
    return broadcasts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True, help="init_info as JSON")
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    sender = WeightSender.init(json.loads(args.init))
    print(json.dumps({"sent": sender.send_weights(weights(1)).checksum}), flush=True)
    sys.stdin.readline()
    slowed(sender.transport.group, args.delay)
    sender.send_weights(weights(2))
    print(json.dumps({"sent": "round 2"}), flush=True)


if __name__ == "__main__":
    main()
