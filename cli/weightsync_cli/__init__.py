"""The `weightsync` command (console script `weightsync_cli.main:main`).

One name for the programs weightsync ships, each of which lives in the package it belongs to:
`weightsync daemon` (weightsync_daemon), `weightsync operator` and `weightsync demo`
(weightsync_operator). This package sits above every layer and imports a subcommand's module only
when that subcommand runs, so `weightsync operator` in the operator image needs no PyTorch and
`weightsync daemon` on a GPU node needs no Kubernetes client.
"""
