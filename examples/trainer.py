"""A trainer that publishes every optimizer step to its inference pods through a WeightSync.

Runs in the trainer pod of examples/trainer-pod.yaml. `connect` (weightsync_operator.trainer_client) serves the trainer
agent and waits until the operator has formed the transfer group; each `push` makes one version
live on every target (or raises PushFailed naming the target that failed and why).
"""

import torch

from weightsync_operator.trainer_client import PushFailed, connect


def main() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = connect("grpo-policy", namespace="rl")  # blocks until the group is formed
    for step in range(1, 1001):
        loss = model(torch.randn(64, 4096, device="cuda")).pow(2).mean()  # your RL loss here
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        try:
            result = sync.push(model.named_parameters(), version=step)
            print(f"step {step}: {result.bytes / 1e9:.2f} GB live in {result.total_seconds:.2f}s "
                  f"({result.gbps:.1f} GB/s)")
        except PushFailed as failure:  # the targets keep serving the last version that went live
            print(f"step {step} not published: {failure.reason}")


if __name__ == "__main__":
    main()
