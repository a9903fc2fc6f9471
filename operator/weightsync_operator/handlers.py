"""The kopf handlers: thin glue between Kubernetes and each WeightSync's Reconciler.

    weightsync operator --all-namespaces          # or: kopf run -m weightsync_operator.handlers -A

- a pod index keeps a small summary of every pod (kopf fills it from a watch);
- one kopf daemon per WeightSync runs its reconciliation loop: a pass, then a nap that ends early
  when the WeightSync's spec or a pod in its namespace changes, and after `recheck_interval`
  anyway (level-based: the loop re-checks the group even when nothing was said to change);
- kopf keeps its finalizer on a WeightSync while the daemon runs; on deletion the daemon makes
  every party leave the group before it returns, and only then may the object go. (No
  on.delete handler: it would make kopf patch its bookkeeping into the object on every version
  bump, one more API write on each sync's critical path.)

`register(registry)` puts them into any registry (tests make a fresh one per operator); importing
this module registers them into kopf's default registry, so `kopf run` finds them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from weightsync.tokens import load_token
from weightsync_operator.kube import KubeApi
from weightsync_operator.pods import PodRef, pod_ref
from weightsync_operator.resource import GROUP, PLURAL, VERSION
from weightsync_operator.runtime import Runtime

FINALIZER = "weightsync.dev/finalizer"
ERROR_BACKOFF = 5.0  # seconds before kopf retries a pass that failed unexpectedly


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.persistence.finalizer = FINALIZER
    # Status belongs to the operator's own schema; kopf keeps its bookkeeping in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="weightsync.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="weightsync.dev", key="last-handled-configuration")
    settings.posting.level = logging.INFO
    if "runtime" not in memo:  # `kopf run -m weightsync_operator.handlers`: defaults from the environment
        memo.runtime = Runtime(KubeApi.from_environment(), token=load_token())


async def cleanup(memo: kopf.Memo, **_) -> None:
    await memo.runtime.close()


# The three handlers below are coroutines although they never wait: kopf runs a plain function in
# a worker thread, a hop (and GIL handover) on every watch event, including the version bump that
# starts a sync round; a coroutine runs on the event loop at once.
async def weightsync_pods(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, PodRef]:
    """Index: namespace → summaries of its pods."""
    return {namespace: pod_ref(body)}


async def pod_changed(*, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    memo.runtime.wake_namespace(_namespaced(namespace))


async def weightsync_changed(*, namespace: str | None, name: str, body: kopf.Body, memo: kopf.Memo,
                             **_: Any) -> None:
    """Wake the loop when the spec changed (the operator's own status writes do not count)."""
    reconciler = memo.runtime.existing(_namespaced(namespace), name)
    generation = body.get("metadata", {}).get("generation")
    if reconciler is not None and generation != reconciler.seen_generation:
        reconciler.seen_generation = generation
        reconciler.wake.set()


async def run_weightsync(*, namespace: str | None, name: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                         memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    """The WeightSync's reconciliation loop; `body` is kopf's live view of the object.

    A pass that fails raises out of here and kopf retries the daemon, as declared in `register`:
    after a `kopf.TemporaryError`'s own delay (a group that failed to form), or after
    ERROR_BACKOFF for anything else (an API or bug-level failure), logged with its traceback. The
    reconciler outlives the retries (memo.runtime holds it), so a retry resumes where it was.
    (A WeightSync deleted while kopf waits to retry goes without the teardown below; the parties
    leave that group when a group is next formed with them.)"""
    namespace = _namespaced(namespace)
    pods: kopf.Index[str | None, PodRef] = kwargs["weightsync_pods"]  # kopf passes each index by its name
    reconciler = memo.runtime.reconciler(namespace, name, body)
    try:
        while not stopped:
            reconciler.wake.clear()
            reconciler.seen_generation = body.get("metadata", {}).get("generation")
            delay = await reconciler.reconcile(body, pods.get(namespace, []))
            await _nap(reconciler.wake, stopped, delay)
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            # The finalizer's work (kopf keeps it on the object until this daemon returns): every
            # party leaves the group, then the WeightSync may go.
            await reconciler.teardown("the WeightSync is being deleted")
            memo.runtime.forget(namespace, name)
            logger.info("the transfer group is torn down")


def _namespaced(namespace: str | None) -> str:
    """Pods and WeightSyncs are namespaced: kopf always names their namespace."""
    if namespace is None:
        raise ValueError("a namespaced object came without its namespace")
    return namespace


async def _nap(wake: asyncio.Event, stopped: kopf.DaemonStopped, delay: float | None) -> None:
    """Sleep until woken, stopped, or `delay` seconds passed (None: no time limit)."""
    if wake.is_set() or stopped or (delay is not None and delay <= 0):
        return
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def register(registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.index("v1", "pods", registry=registry)(weightsync_pods)
    kopf.on.event("v1", "pods", registry=registry)(pod_changed)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(weightsync_changed)
    # While a deleted WeightSync's daemon tears the group down, kopf re-checks every
    # `cancellation_polling` seconds whether it may release the finalizer (its default is 60).
    # A failed pass is retried by kopf for as long as the WeightSync exists (retries=None).
    kopf.daemon(GROUP, VERSION, PLURAL, cancellation_polling=0.5, errors=kopf.ErrorsMode.TEMPORARY,
                backoff=ERROR_BACKOFF, retries=None, registry=registry)(run_weightsync)
    return registry


register(kopf.get_default_registry())
