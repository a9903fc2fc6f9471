"""Issue 7, fault 2c: the operator restarted mid-sync.

The operator runs as its own process (`weightsync operator`, as the chart runs it) against the
emulated API server, with real daemon processes and a real trainer process on the cpu transport.
While a round is in flight (status Syncing, every daemon in its update phase) the operator is
killed, by SIGKILL (a crash, an OOM kill) or SIGTERM (a rollout, a drained node), and a fresh
operator process takes over. The round must end (Succeeded, or Failed with a reason), never stay
in a running phase; no party may hang; the targets hold either their previous version, bit-exact,
or the new one, and never report the old version while holding the abandoned round's bytes; and
the trainer's next version goes through.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.k8s_harness import (NAME, NS, Trainer, checksums, cluster, free_port, operator_process, spec,
                                 start_daemons, until)

pytestmark = [pytest.mark.k8s, pytest.mark.faults]

TRANSFER_SECONDS = 5  # spec()'s timeouts.transferSeconds
TERMINAL_PHASES = ("Succeeded", "Failed")


async def update_calls(http: httpx.AsyncClient, url: str) -> int:
    """How many /update_weights calls this party has answered (its update-phase histogram)."""
    for family in text_string_to_metric_families((await http.get(url + "/metrics")).text):
        for sample in family.samples:
            if sample.name == "weightsync_update_duration_seconds_count" and sample.labels.get("phase") == "update":
                return int(sample.value)
    return 0


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
async def test_operator_restarted_mid_sync_round_ends_and_next_version_succeeds(tmp_path, stop_signal):
    log = tmp_path / "operator.log"
    async with cluster(tmp_path) as c:
        # Version 2's round is held in flight (the trainer's source waits after its first tensor
        # until `release` exists) until the operator was stopped, whatever the machine's speed.
        release = tmp_path / "release-round-2"
        await c.create_weightsync(NS, NAME, spec(free_port(), packedBufferSizeBytes=1 << 16))
        daemons, trainer = await asyncio.gather(start_daemons(2), Trainer.start(c, NS, NAME, "trainer-0", mbytes=8))
        urls = [d.url for d in daemons]
        try:
            async with operator_process(c.kubeconfig, log) as first, httpx.AsyncClient(timeout=10) as http:
                await c.create_pod(NS, "trainer-0", "trainer", NAME, trainer.url)
                for d in daemons:
                    await c.create_pod(NS, d.name, "inference", NAME, d.url, rendezvous_port=free_port())
                assert (await trainer.wait_ready())["ok"]
                v1 = await trainer.push(1)
                assert v1["ok"], v1
                before = await checksums(http, urls)
                assert before == [("1", v1["checksum"])] * 2

                # Version 2 in flight: the status says Syncing and every target is in the round.
                push = asyncio.create_task(trainer.push(2, hold=release))

                async def in_flight():
                    if c.weightsync(NS, NAME)["status"].get("phase") != "Syncing":
                        return False
                    phases = [(await http.get(u + "/healthz")).json()["phase"] for u in urls]
                    return phases == ["updating"] * 2

                await until(in_flight, 30, "the round for version 2 to be in flight")
                first.send_signal(stop_signal)
                await asyncio.wait_for(first.wait(), 30)
                stopped_at = c.weightsync(NS, NAME)["status"]
                assert not push.done(), "the round ended before the operator was stopped"
                assert stopped_at["phase"] == "Syncing" and stopped_at["lastSync"]["version"] == 1, stopped_at
                written_before_restart = len(c.statuses(NS, NAME))
                release.touch()  # the round goes on (or has failed by its timeout) with no operator

                # With no operator, no party hangs in the collective: every /update_weights call
                # of round 2 returns (done, or failed by the transfer timeout) on its own.
                async def updates_returned():
                    counts = [await update_calls(http, u) for u in [trainer.url, *urls]]
                    return counts == [2] * 3
                await until(updates_returned, 2 * TRANSFER_SECONDS, "every party's round-2 update to return")

            # A fresh operator process takes over the WeightSync as the old one left it.
            async with operator_process(c.kubeconfig, log), httpx.AsyncClient(timeout=10) as http:
                obj = await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") in TERMINAL_PHASES
                                       and o["status"].get("lastSync", {}).get("version") == 2, 45,
                                       "an outcome for version 2 after the restart")
                status = obj["status"]
                conditions = {x["type"]: x for x in status["conditions"]}
                assert conditions["Progressing"]["status"] == "False"
                # The trainer's push returns (within its timeout) with the operator's outcome.
                answer = await asyncio.wait_for(push, 30)
                assert answer["ok"] == (status["phase"] == "Succeeded"), (answer, status)
                # Every party answers and none is held in a collective: the new operator could
                # make each leave its group and join a new one (or run the round to its end).
                for url in [trainer.url, *urls]:
                    health = (await http.get(url + "/healthz")).json()
                    assert health["phase"] in ("ready", "uninitialized"), (url, health)
                if status["phase"] == "Succeeded":
                    assert status["currentVersion"] == 2 and status["lastSync"]["outcome"] == "Succeeded"
                    assert conditions["Ready"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
                    assert await checksums(http, urls) == [("2", answer["checksum"])] * 2
                else:
                    assert status["lastSync"]["outcome"] == "Failed" and status["lastSync"]["reason"]
                    assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"]
                    assert answer["reason"] == status["lastSync"]["reason"]
                    # Each target holds version 1 bit-exact, or says its weights are not intact.
                    for url, held, had in zip(urls, await checksums(http, urls), before, strict=True):
                        health = (await http.get(url + "/healthz")).json()
                        assert held == had or not health["weights_intact"], (url, health)

                # Round 2's bytes landed in the targets before the new operator closed the group:
                # no status may then call a target Synced at version 1, whose bytes it lost.
                for past in c.statuses(NS, NAME)[written_before_restart:]:
                    for target in past.get("targets") or []:
                        assert not (target["state"] == "Synced" and target.get("version") == "1"), past

                # The next version bump goes through the restarted operator.
                await c.wait_for(NS, NAME, lambda o: o["status"].get("phase") in ("Ready", "Succeeded")
                                 and o["status"].get("readyTargets") == "2/2", 30, "the group ready again")
                v3 = await trainer.push(3)
                assert v3["ok"], v3
                obj = c.weightsync(NS, NAME)
                assert obj["status"]["phase"] == "Succeeded" and obj["status"]["currentVersion"] == 3
                assert await checksums(http, urls) == [("3", v3["checksum"])] * 2

        except BaseException:
            print(log.read_text()[-8000:] if log.exists() else "no operator log")
            raise
        finally:
            await trainer.stop()
            await asyncio.gather(*(d.stop() for d in daemons))
