"""Render docs/dashboard.png: the chart's Grafana dashboard, drawn from real metrics.

A trainer agent (the demo's small transformer) and two standalone daemons run as local
processes; a real Prometheus scrapes them every second, labelled the way the chart's
ServiceMonitor labels pods (namespace, pod, weightsync_dev_sync, weightsync_dev_role); the
coordinator syncs after every training step. Mid-run daemon-1 is restarted with a wrong
manifest (a misconfiguration: every round fails with manifest_mismatch), then restarted
correctly and catches up. Afterwards each panel's own PromQL, taken from
charts/weightsync/dashboards/weightsync.json, is evaluated by that Prometheus and drawn with
matplotlib on the dashboard's grid. Nothing is simulated: every number comes from a query.

Needs `prometheus` on PATH (Debian: apt-get install prometheus) and matplotlib:
    .venv/bin/pip install matplotlib && .venv/bin/python docs/render_dashboard.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from weightsync.dtypes import tensors_manifest
from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts
from weightsync_operator.demo.model import build_model
from weightsync_operator.local import LocalProcess, free_port, stop_all

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = json.loads((ROOT / "charts" / "weightsync" / "dashboards" / "weightsync.json").read_text())
TOKEN = "render-dashboard"
SYNC, NAMESPACE, SCRAPE = "grpo-policy", "rl-demo", 1  # scrape interval, seconds
ENV = {**os.environ, "WEIGHTSYNC_AUTH_TOKEN": TOKEN}


# -- the run ------------------------------------------------------------------------------

async def start_daemon(name: str, port: int, manifest: Path | None = None) -> LocalProcess:
    args = ["--host", "127.0.0.1", "--port", str(port), "--backend", "cpu"]
    return await LocalProcess.start(name, "weightsync_daemon", args + (["--manifest", str(manifest)] if manifest else []),
                                    timeout=60, env=ENV)


def prometheus_config(targets: dict[str, tuple[str, str]]) -> str:
    """Static targets carrying the labels Kubernetes discovery and podTargetLabels would add."""
    configs = [{"targets": [address], "labels": {"namespace": NAMESPACE, "pod": pod, "weightsync_dev_sync": SYNC,
                                                 "weightsync_dev_role": role}}
               for pod, (address, role) in targets.items()]
    return json.dumps({"global": {"scrape_interval": f"{SCRAPE}s", "scrape_timeout": f"{SCRAPE}s"},
                       "scrape_configs": [{"job_name": "weightsync", "static_configs": configs}]})


async def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url, timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout}s")


async def rounds(coordinator: Coordinator, http: httpx.AsyncClient, trainer: LocalProcess, count: int,
                 every: float, log: list) -> None:
    """Train a step and sync it, once every `every` seconds."""
    for _ in range(count):
        began = time.monotonic()
        step = (await http.post(trainer.url + "/demo/train_step", headers={"Authorization": f"Bearer {TOKEN}"})).json()
        result = await coordinator.sync(f"step-{step['step']}")
        log.append((step["step"], result.ok, result.reason))
        print(f"step {step['step']}: {'ok' if result.ok else 'FAILED ' + str(result.reason)[:80]}", flush=True)
        await asyncio.sleep(max(0.0, every - (time.monotonic() - began)))


async def run(workdir: Path, seconds_per_phase: float, every: float) -> tuple[str, float, float, list]:
    ports = {"daemon-0": free_port(), "daemon-1": free_port()}
    wrong = workdir / "wrong-manifest.json"
    manifest = tensors_manifest(list(build_model(0).named_parameters())).model_dump(mode="json")
    manifest["tensors"][0]["shape"][0] += 1  # a daemon configured for a different model
    wrong.write_text(json.dumps(manifest))

    trainer = await LocalProcess.start("trainer", "weightsync_operator.demo.worker", ["--role", "trainer"], 60, ENV)
    daemons = {name: await start_daemon(name, port) for name, port in ports.items()}
    processes = [trainer, *daemons.values()]
    prom_port = free_port()
    targets = {"trainer": (trainer.url.split("//")[1], "trainer")}
    targets |= {name: (f"127.0.0.1:{port}", "inference") for name, port in ports.items()}
    (workdir / "prometheus.yml").write_text(prometheus_config(targets))
    prom = subprocess.Popen(["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom_url = f"http://127.0.0.1:{prom_port}"
    log: list = []
    spec = SyncSpec(master_port=free_port(), packed_buffer_size_bytes=1 << 20, transfer_timeout=10,
                    timeouts=Timeouts(request=3, init=20, start=5, update=15, finish=5))
    try:
        await wait_ready(prom_url + "/-/ready")
        start = time.time()
        await asyncio.sleep(5 * SCRAPE)
        n = max(1, int(seconds_per_phase / every))
        async with httpx.AsyncClient(timeout=30) as http:
            def coordinator() -> Coordinator:
                return Coordinator(trainer.endpoint, [d.endpoint for d in daemons.values()], spec, http, token=TOKEN)

            async with coordinator() as c:  # healthy
                await c.init()
                await rounds(c, http, trainer, n, every, log)
            await daemons["daemon-1"].stop()  # restarted with the wrong manifest
            await asyncio.sleep(6 * SCRAPE)
            daemons["daemon-1"] = await start_daemon("daemon-1", ports["daemon-1"], wrong)
            processes.append(daemons["daemon-1"])
            async with coordinator() as c:
                await c.init()
                await rounds(c, http, trainer, n // 2, every, log)
            await daemons["daemon-1"].stop()  # fixed
            await asyncio.sleep(6 * SCRAPE)
            daemons["daemon-1"] = await start_daemon("daemon-1", ports["daemon-1"])
            processes.append(daemons["daemon-1"])
            await asyncio.sleep(6 * SCRAPE)  # back, still on version 0 until the next round
            async with coordinator() as c:
                await c.init()
                await rounds(c, http, trainer, n, every, log)
        await asyncio.sleep(3 * SCRAPE)
        end = time.time()
        return prom_url, start, end, log, prom
    except BaseException:
        prom.terminate()
        raise
    finally:
        await stop_all(processes)


# -- the queries --------------------------------------------------------------------------

def substitute(expr: str, rate_interval: str, range_: str) -> str:
    for var in ("$job", "$namespace", "$sync"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)


def legend(template: str, labels: dict) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def query_panels(prom_url: str, start: float, end: float) -> list[dict]:
    rate_interval = f"{8 * SCRAPE}s"
    range_ = f"{int(end - start)}s"
    results = []
    with httpx.Client(base_url=prom_url, timeout=30) as http:
        for panel in DASHBOARD["panels"]:
            series = []
            for target in panel["targets"]:
                expr = substitute(target["expr"], rate_interval, range_)
                if target.get("instant"):
                    body = http.get("/api/v1/query", params={"query": expr, "time": end}).json()
                else:
                    body = http.get("/api/v1/query_range",
                                    params={"query": expr, "start": start, "end": end, "step": SCRAPE}).json()
                assert body["status"] == "success", (panel["title"], expr, body)
                for item in body["data"]["result"]:
                    name = legend(target.get("legendFormat", ""), item["metric"])
                    points = item.get("values") or [item["value"]]
                    series.append((name, [(float(t), float(v)) for t, v in points]))
            results.append({"panel": panel, "series": series})
    return results


# -- the picture --------------------------------------------------------------------------

def human(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.0f} s" if value >= 10 else f"{value:.2f} s"
    if unit in ("bytes", "Bps"):
        for suffix in ("", "k", "M", "G", "T"):
            if abs(value) < 1000:
                return f"{value:.1f} {suffix}B" + ("/s" if unit == "Bps" else "")
            value /= 1000
    return f"{value:.0f}"


def draw(results: list[dict], start: float, end: float, out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    background, panel_bg, text, grid = "#111217", "#181b1f", "#ccccdc", "#2c3235"
    colors = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
    named = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830", "yellow": "#fade2a", "blue": "#5794f2",
             "purple": "#b877d9", "dark-red": "#c4162a"}
    rows = max(p["panel"]["gridPos"]["y"] + p["panel"]["gridPos"]["h"] for p in results)
    fig = plt.figure(figsize=(20, rows * 0.42 + 1.2), facecolor=background)
    fig.text(0.01, 0.985, "weightsync", color=text, fontsize=17, weight="bold", va="top")
    fig.text(0.01, 0.962, subtitle, color="#8e8e8e", fontsize=10, va="top")
    top, height = 0.94, 0.92
    for result in results:
        panel, series = result["panel"], result["series"]
        pos = panel["gridPos"]
        unit = panel["fieldConfig"]["defaults"]["unit"]
        rect = [0.01 + pos["x"] / 24 * 0.98 + 0.003, top - (pos["y"] + pos["h"]) / rows * height + 0.006,
                pos["w"] / 24 * 0.98 - 0.006, pos["h"] / rows * height - 0.012]
        ax = fig.add_axes(rect, facecolor=panel_bg)
        for side in ax.spines.values():
            side.set_color(grid)
        ax.set_title(panel["title"], color=text, fontsize=10.5, loc="left", pad=5)
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        if panel["type"] == "stat":
            ax.set_xticks([]), ax.set_yticks([])
            lines = [(name, values[-1][1]) for name, values in series]
            for i, (name, value) in enumerate(lines):
                steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
                color = next((s["color"] for s in reversed(steps) if s["value"] is None or value >= s["value"]), "#73bf69")
                color = next((p["value"]["fixedColor"] for o in panel["fieldConfig"]["overrides"]
                              if o["matcher"]["options"] == name for p in o["properties"] if p["id"] == "color"), color)
                color = named.get(color, color)
                label = f"{name}: " if len(lines) > 1 else ""
                ax.text(0.5, 0.5 + (len(lines) - 1) * 0.17 - i * 0.34, label + human(value, unit), color=color,
                        fontsize=22 if len(lines) == 1 else 15, weight="bold", ha="center", va="center",
                        transform=ax.transAxes)
            if not lines:
                ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        elif panel["type"] == "bargauge":
            bars = sorted((name, values[-1][1]) for name, values in series)
            ax.barh([b[0] for b in bars], [b[1] for b in bars],
                    color=["#f2495c" if v >= 1 else "#73bf69" for _, v in bars], height=0.5)
            for i, (_, value) in enumerate(bars):
                ax.text(value, i, f"  {value:.0f}", color=text, va="center", fontsize=10)
            ax.set_xlim(0, max([1.0] + [v * 1.25 for _, v in bars]))
            ax.tick_params(axis="y", labelsize=10)
            ax.grid(axis="x", color=grid, linewidth=0.6)
        else:
            bars = panel["fieldConfig"]["defaults"].get("custom", {}).get("drawStyle") == "bars"
            fixed = {o["matcher"]["options"]: p["value"]["fixedColor"] for o in panel["fieldConfig"]["overrides"]
                     for p in o["properties"] if p["id"] == "color"}
            for i, (name, values) in enumerate(sorted(series)):
                color = named.get(fixed.get(name), colors[i % len(colors)])
                times, ys = [], []
                for k, (t, v) in enumerate(values):
                    if k and t - values[k - 1][0] > 1.5 * SCRAPE:  # no data in between: a gap, as Grafana draws it
                        times.append(datetime.fromtimestamp(t - SCRAPE))
                        ys.append(float("nan"))
                    times.append(datetime.fromtimestamp(t))
                    ys.append(v)
                if bars:
                    ax.bar(times, ys, width=SCRAPE / 86400 * 0.9, color=color, label=name)
                else:
                    step = panel["fieldConfig"]["defaults"].get("custom", {}).get("lineInterpolation") == "stepAfter"
                    ax.plot(times, ys, color=color, linewidth=1.4, label=name,
                            drawstyle="steps-post" if step else "default")
            if panel["fieldConfig"]["defaults"].get("custom", {}).get("scaleDistribution", {}).get("type") == "log":
                ax.set_yscale("log")
            ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, unit=unit: human(v, unit)))
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.grid(color=grid, linewidth=0.6)
            if series:
                ax.legend(loc="upper left", fontsize=7.5, facecolor=panel_bg, edgecolor=grid, labelcolor=text,
                          ncol=2 if len(series) > 4 else 1)
            else:
                ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=background)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=60, help="length of the healthy phases")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between training steps")
    args = parser.parse_args()
    if not shutil.which("prometheus"):
        raise SystemExit("needs the prometheus binary on PATH (Debian: apt-get install prometheus)")
    with tempfile.TemporaryDirectory() as tmp:
        prom_url, start, end, log, prom = asyncio.run(run(Path(tmp), args.seconds, args.every))
        try:
            results = query_panels(prom_url, start, end)
            raw = httpx.get(prom_url + "/api/v1/query", params={"query": 'weightsync_updates_total{pod="trainer"}',
                                                                  "time": end}).json()["data"]["result"]
            print("trainer's counters at the end:", {r["metric"]["outcome"]: r["value"][1] for r in raw})
        finally:
            prom.terminate()
            prom.wait(10)
    ok = sum(1 for _, good, _ in log if good)
    subtitle = (f"Rendered from a real local run: a trainer and 2 daemons (gloo), {len(log)} training steps each "
                f"followed by a sync ({ok} succeeded), "
                f"scraped every {SCRAPE}s by Prometheus; every panel is its own query. "
                f"Mid-run daemon-1 restarts with a wrong manifest, then restarts fixed and catches up.")
    draw(results, start, end, args.out, subtitle)
    print(f"wrote {args.out} ({ok}/{len(log)} rounds succeeded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
