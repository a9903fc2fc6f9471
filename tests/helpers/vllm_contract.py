"""The backend's contract with the vLLM installed beside it, checked from that vLLM's own code.

Run with the python of a venv holding vLLM (0.32's CPU build, or 0.33's wheel installed without
its dependencies: `make vllm033-venv`); prints one JSON object, a check's name -> {"ok", "detail"}.
tests/engines/test_vllm_contract.py runs it once per vLLM and asserts each check.

Nothing here needs a vLLM server or a GPU, so it works where vLLM's GPU build cannot serve:

- the trainer engine, through vLLM's own `WeightTransferTrainerFactory` and `ModuleSource`, sends
  two rounds to a weightsync receiver (the cpu transport, in threads), driven through vLLM's
  four-method client protocol;
- a source whose parameter some trainer rank does not own (0.33's `ParamMeta.owners`) is
  refused at init, naming the parameter;
- the worker engine's overrides match the parameter names of vLLM's `WeightTransferEngine`, and
  it implements every abstract method (read from engines/weightsync_vllm/engine.py's syntax,
  since importing it needs vLLM's model loader, which this venv may not hold);
- every `from vllm... import name` of the backend resolves in this vLLM's source files;
- every route the backend's trainer and the operator's vLLM client call exists in this vLLM with
  that method, and every query parameter they send is one the route declares.
"""

from __future__ import annotations

import ast
import inspect
import json
import socket
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "engines" / "weightsync_vllm"
# The callers of vLLM's HTTP routes: (file, the class that calls them, or None for the module).
ROUTE_CALLERS = ((BACKEND / "trainer.py", None),
                 (ROOT / "operator" / "weightsync_operator" / "client.py", "VllmClient"))
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReceiverClient:
    """vLLM's `VLLMWeightSyncClient` protocol (four methods, structural) over a weightsync
    receiver in this process: what vLLM's worker engine does with each call, minus the model."""

    def __init__(self, store):
        self.store = store
        self.receiver = None
        self.calls: list[str] = []
        self.versions: list[str | None] = []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        import torch

        from weightsync.protocol import InitInfo
        from weightsync.transports import get_transport

        self.calls.append("init")
        info = InitInfo(**init_info)
        self.receiver = get_transport(info.backend).connect(info, 1, torch.device("cpu"))

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict) -> None:
        from weightsync.protocol import UpdateInfo

        self.calls.append("update")
        self.receiver.receive(self.store, UpdateInfo.model_validate(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")
        self.versions.append(weight_version)


def check_trainer_engine_sends_vllms_module_source() -> str:
    import torch
    from vllm.distributed.weight_transfer.base import ModuleSource, TrainerWeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from weightsync import WeightStore
    from weightsync_vllm.trainer_engine import WeightsyncTrainerEngine, WeightsyncTrainerInitInfo

    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    served = WeightStore.from_module(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)))
    client = ReceiverClient(served)
    info = WeightsyncTrainerInitInfo(master_address="127.0.0.1", master_port=free_port(), world_size=2, rank=0,
                                     transport="cpu", timeout_seconds=60, init_timeout_seconds=60)
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=ModuleSource(trained))
    try:
        assert isinstance(engine, WeightsyncTrainerEngine) and isinstance(engine, TrainerWeightTransferEngine)
        assert engine.rank == 0 and engine.is_sender, (engine.rank, engine.is_sender)
        for version in ("v1", "v2"):
            engine.send_weights(version)
            wrong = [n for n, p in trained.named_parameters() if not torch.equal(served[n], p.detach())]
            assert not wrong, f"round {version}: the receiver's {wrong} differ from the trainer's"
            with torch.no_grad():
                for p in trained.parameters():
                    p.mul_(2).add_(1)
        assert client.calls == ["init", "start", "update", "finish", "start", "update", "finish"], client.calls
        assert client.versions == ["v1", "v2"], client.versions
    finally:
        engine.shutdown()
        if client.receiver is not None:
            client.receiver.close()
    return f"2 rounds of {len(list(trained.parameters()))} tensors bit-exact; calls {client.calls}"


def check_vllm_trainer_push_takes_vllms_module_source() -> str:
    """What VLLMTrainer.push reads of vLLM's own ModuleSource before calling any server: the
    manifest from its metadata, and a stream of its tensors in that order."""
    import torch
    from vllm.distributed.weight_transfer.base import ModuleSource

    from weightsync_vllm.trainer import _checked

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    checked = _checked(ModuleSource(model))
    names = [n for n, _ in model.named_parameters()]
    assert checked.manifest.names == names, checked.manifest.names
    streamed = list(checked)
    assert [n for n, _ in streamed] == names
    assert all(torch.equal(t, p) for (_, t), p in zip(streamed, model.parameters(), strict=True))
    return f"manifest and stream of {len(names)} tensors"


def check_a_parameter_a_trainer_rank_does_not_own_is_refused() -> str:
    import vllm.distributed.weight_transfer.base as base

    from weightsync_vllm.trainer_engine import WeightsyncTrainerEngine, WeightsyncTrainerInitInfo

    if not hasattr(base, "ParamMeta") or "owners" not in inspect.signature(base.ParamMeta).parameters:
        return "this vLLM has no ParamMeta.owners: nothing to refuse"
    import torch
    from functools import cached_property

    class OwnedElsewhere(base.WeightSource):
        @cached_property
        def metadata(self):
            return [base.ParamMeta("lm_head.weight", torch.float32, (4, 4), owners=(1,))]

        def iter_full(self):
            return iter(())

    client = ReceiverClient(store=None)
    info = WeightsyncTrainerInitInfo(master_address="127.0.0.1", master_port=free_port(), world_size=2, rank=0,
                                     transport="cpu")
    try:
        WeightsyncTrainerEngine.trainer_init(info, client=client, source=OwnedElsewhere())
    except ValueError as refused:
        assert "'lm_head.weight'" in str(refused), refused
        assert client.calls == [], f"refused after calling vLLM: {client.calls}"
        return str(refused)
    raise AssertionError("a parameter owned by trainer rank 1 alone was accepted by a 1-rank trainer")


def _class_node(path: Path, name: str) -> ast.ClassDef:
    tree = ast.parse(path.read_text())
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    return node


def check_worker_engine_overrides_match_vllms_base() -> str:
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    node = _class_node(BACKEND / "engine.py", "WeightsyncWorkerEngine")
    methods = {f.name: f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    attributes = {t.id for a in node.body if isinstance(a, ast.Assign) for t in a.targets if isinstance(t, ast.Name)}
    problems = [f"abstract {name}() not implemented" for name in sorted(WeightTransferEngine.__abstractmethods__)
                if name not in methods]
    overridden = []
    for name, function in methods.items():
        theirs = getattr(WeightTransferEngine, name, None)
        if theirs is None or not callable(theirs):
            continue
        overridden.append(name)
        ours = [a.arg for a in function.args.args + function.args.kwonlyargs]
        expected = list(inspect.signature(theirs).parameters)
        if ours != expected:
            problems.append(f"{name}{tuple(ours)} overrides vLLM's {name}{tuple(expected)}")
    problems += [f"class attribute {a} is not one of vLLM's" for a in sorted(attributes)
                 if not hasattr(WeightTransferEngine, a) and a not in WeightTransferEngine.__annotations__]
    assert not problems, problems
    return f"overrides {sorted(overridden)}; attributes {sorted(attributes)}"


def _defined_names(module: Path) -> set[str]:
    """Top-level names a module file binds (defs, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions count (TYPE_CHECKING aside)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
    return names


def _module_file(vllm_root: Path, dotted: str) -> Path | None:
    relative = Path(*dotted.split(".")[1:])
    for candidate in (vllm_root / relative.with_suffix(".py"), vllm_root / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def check_the_backends_vllm_imports_resolve() -> str:
    import vllm

    vllm_root = Path(vllm.__file__).parent
    problems, seen = [], 0
    for path in sorted(BACKEND.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                module = _module_file(vllm_root, node.module)
                if module is None:
                    problems.append(f"{path.name}: no module {node.module}")
                    continue
                defined = _defined_names(module)
                for alias in node.names:
                    seen += 1
                    submodule = _module_file(vllm_root, f"{node.module}.{alias.name}")
                    if alias.name not in defined and submodule is None:
                        problems.append(f"{path.name}: {node.module} has no {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vllm" and alias.name != "vllm":
                        seen += 1
                        if _module_file(vllm_root, alias.name) is None:
                            problems.append(f"{path.name}: no module {alias.name}")
    assert not problems, problems
    return f"{seen} names imported from vLLM resolve"


def _vllm_routes(vllm_root: Path) -> dict[tuple[str, str], set[str]]:
    """(METHOD, path) -> the route function's parameter names, for every route decorator in
    vLLM's entrypoints (`@router.post("/pause")` and the like)."""
    routes: dict[tuple[str, str], set[str]] = {}
    for path in (vllm_root / "entrypoints").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr.upper() in HTTP_METHODS and decorator.args
                        and isinstance(decorator.args[0], ast.Constant) and isinstance(decorator.args[0].value, str)):
                    params = {a.arg for a in node.args.args + node.args.kwonlyargs}
                    routes.setdefault((decorator.func.attr.upper(), decorator.args[0].value), set()).update(params)
    return routes


def _route_calls(path: Path, class_name: str | None) -> list[tuple[str, str, set[str]]]:
    """(METHOD, path, query parameter names) of every call with a method and a path literal."""
    scope = _class_node(path, class_name) if class_name else ast.parse(path.read_text())
    calls = []
    for node in ast.walk(scope):
        if not isinstance(node, ast.Call):
            continue
        literals = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        method = next((s for s in literals if s in HTTP_METHODS), None)
        route = next((s for s in literals if s.startswith("/")), None)
        if method and route:
            query = next((k.value for k in node.keywords if k.arg == "params"), None)
            keys = set()
            if isinstance(query, ast.Dict):
                keys = {k.value for k in query.keys if isinstance(k, ast.Constant)}
            calls.append((method, route, keys))
    return calls


def check_the_routes_the_backend_calls_exist() -> str:
    import vllm

    routes = _vllm_routes(Path(vllm.__file__).parent)
    problems, called = [], set()
    for path, class_name in ROUTE_CALLERS:
        for method, route, query in _route_calls(path, class_name):
            called.add(f"{method} {route}")
            if (method, route) not in routes:
                problems.append(f"{path.name}: {method} {route} is not a route of this vLLM")
            elif query - routes[(method, route)]:
                problems.append(f"{path.name}: {method} {route} sends {sorted(query - routes[(method, route)])}, "
                                f"which the route does not declare ({sorted(routes[(method, route)])})")
    assert len(called) >= 10, f"found only {sorted(called)}: did the callers change shape?"
    assert not problems, problems
    return f"{len(called)} routes: {sorted(called)}"


CHECKS = [check_trainer_engine_sends_vllms_module_source, check_vllm_trainer_push_takes_vllms_module_source,
          check_a_parameter_a_trainer_rank_does_not_own_is_refused,
          check_worker_engine_overrides_match_vllms_base, check_the_backends_vllm_imports_resolve,
          check_the_routes_the_backend_calls_exist]


def main() -> None:
    import vllm

    report = {"vllm": vllm.__version__}
    for check in CHECKS:
        try:
            report[check.__name__] = {"ok": True, "detail": check()}
        except BaseException:  # noqa: BLE001 - every failure is reported, with its traceback
            report[check.__name__] = {"ok": False, "detail": traceback.format_exc()[-4000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
