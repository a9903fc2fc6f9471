"""A trainer process for fault tests: joins the group, sends one round at full speed, then on
"go" (stdin) sends a second round slowly, printing each payload chunk so a test can kill it mid-way."""

import argparse
import json
import sys
import time

import torch

from weightsync import WeightSender


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.weight", torch.randn(128, 128, generator=gen)) for i in range(16)]


def slowed(group, delay: float):
    """Wrap the group's broadcast: sleep before each one and report how many went out."""
    original = group.broadcast
    count = {"n": 0}

    def broadcast(tensor, src=0):
        time.sleep(delay)
        count["n"] += 1
        print(json.dumps({"broadcasts": count["n"]}), flush=True)
        return original(tensor, src)

    group.broadcast = broadcast


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
