"""`weightsync operator`: run the kopf operator over `weightsync_operator.handlers`.

    weightsync operator --all-namespaces --liveness http://0.0.0.0:8080/healthz
    weightsync operator --namespace rl --namespace eval --standalone

Credentials come from the pod's service account in a cluster, else the kubeconfig ($KUBECONFIG);
the daemons' bearer token from --token-file or $WEIGHTSYNC_AUTH_TOKEN. It runs until SIGTERM or
SIGINT (kopf then stops its handlers and exits 0); its stdin is never read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterator

from weightsync import cli_args
from weightsync.tokens import TOKEN_ENV, TokenError, load_token

log = logging.getLogger("weightsync.operator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_args.Parser(prog="weightsync operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve WeightSyncs in this namespace (repeatable; kopf's globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME",
                         help="coordinate with other operator replicas through this kopf peering object")
    peering.add_argument("--standalone", action="store_true", help="no peering: the only operator")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority: the highest-priority replica works, the others stand by "
                             "(default with --peering: a random one, so replicas never tie)")
    parser.add_argument("--liveness", metavar="URL", type=cli_args.http_url,
                        help="serve a liveness probe there, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--token-file", type=cli_args.token_file, default=None, metavar="FILE",
                        help=f"bearer token for the daemons' mutating endpoints (none: ${TOKEN_ENV})")
    parser.add_argument("--recheck-interval", type=cli_args.positive_seconds, default=30.0, metavar="SECONDS",
                        help="how often each group's health is re-checked even if nothing changed")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def peering_priority(args: argparse.Namespace) -> int | None:
    """The replica's peering priority. Replicas of one Deployment share their arguments, and with
    equal priorities every replica would work at once; a random one elects a single active replica."""
    if args.priority is None and args.peering:
        return secrets.randbelow(2**31 - 1) + 1
    return args.priority


@contextlib.contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop | None]:
    """The loop the operator runs in: uvloop's where it is installed (the `operator` extra brings
    it), as kopf's own CLI does. Every round's control calls go through this one loop, and uvloop's
    C transports cut its CPU per call (benchmarks/operator_fleet.py); None: asyncio's default."""
    try:
        import uvloop
    except ImportError:
        yield None
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        yield runner.get_loop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kopf  # imported here: `weightsync demo` and `weightsync daemon` never need it
    from kubernetes.config import ConfigException

    from weightsync_operator import handlers  # noqa: F401  (importing it registers the handlers)
    from weightsync_operator.kube import KubeApi
    from weightsync_operator.runtime import Runtime

    kopf.configure(verbose=args.verbose)
    priority = peering_priority(args)
    clusterwide = args.all_namespaces or not args.namespace
    if not args.all_namespaces and not args.namespace:
        log.warning("neither --namespace nor --all-namespaces: serving all namespaces")
    try:
        kube = KubeApi.from_environment()
    except ConfigException as error:  # no service account and no usable kubeconfig
        cli_args.fail("weightsync operator", f"no Kubernetes credentials: {error}")
    try:
        token = load_token(args.token_file)
    except TokenError as error:
        cli_args.fail("weightsync operator", str(error))
    runtime = Runtime(kube, token=token, recheck_interval=args.recheck_interval)
    with event_loop() as loop:
        kopf.run(loop=loop, registry=kopf.get_default_registry(), clusterwide=clusterwide,
                 namespaces=args.namespace, standalone=True if args.standalone else None,
                 peering_name=args.peering, priority=priority, liveness_endpoint=args.liveness,
                 memo=kopf.Memo(runtime=runtime))
    return 0
