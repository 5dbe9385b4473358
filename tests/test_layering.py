"""The project's dependencies point one way (docs/architecture.md, "Module map" and "Layering"):

    mmcache_client  <-  mmcache.common  <-  mmcache (the sidecar)
          ^                   ^
          +--- encoder_worker, llm_worker (workers: the SDK and the serving helper only)

- the SDK imports nothing of the project;
- ``mmcache`` imports no worker (``mmcache up`` starts them by module name);
- ``mmcache.common`` imports nothing else of ``mmcache``;
- the workers import of ``mmcache`` only ``mmcache.common``;
- ``llm_worker`` reaches into ``encoder_worker`` only along the edges listed below.

Every import counts, at module level or inside a function, so a lazy import cannot hide one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mmcache_client": ROOT / "clients/python/mmcache_client", "mmcache": ROOT / "mmcache",
            "encoder_worker": ROOT / "encoder_worker", "llm_worker": ROOT / "llm_worker"}
LLM_USES_ENCODER = {
    # NOTE: the aggregated baseline (a "both" worker encodes in process), the built-in model
    # builder (the LLM's weights come from the same generated checkpoint), the namespace digest
    # and the router's hashing of data: URIs. Debt to pay down, not to grow.
    "llm_worker.serve.service": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.serve.app": {"encoder_worker.encoder", "encoder_worker.media", "encoder_worker.models",
                       "encoder_worker.video"},
    "llm_worker.serve.config": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.router.router": {"encoder_worker.video"},
    "llm_worker.router.encoding": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.router.app": {"encoder_worker.models"},
    "llm_worker.cli": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.engine.engine": {"encoder_worker.namespace"},
    # NOTE: the planner's profiler times the encoder the workers run, on the model they build.
    "llm_worker.planner.profile": {"encoder_worker.encoder", "encoder_worker.media", "encoder_worker.models"},
    # NOTE: an elastic worker holds the vision tower by definition (it switches between encode,
    # prefill and decode while serving): it runs the encoder's own service, batcher, config and
    # /v1/encode handler in process rather than a second copy of them.
    "llm_worker.elastic.app": {"encoder_worker.app", "encoder_worker.batcher", "encoder_worker.config",
                               "encoder_worker.encoder", "encoder_worker.models", "encoder_worker.service"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, path in PACKAGES.items():
        for f in path.rglob("*.py"):
            rel = f.relative_to(path).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[:-node.level] if not path.name == "__init__.py" else \
                    name.split(".")[:len(name.split(".")) - node.level + 1]
                found.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


MODULES = _modules()


FOLDERS = {
    # folder: (its job in one line, the folders of its own package it may import)
    "mmcache.common": ("what every server shares: app runner, HTTP bounds, secrets, tenants, sizes", set()),
    "mmcache.core": ("the cache whatever its tiers: store, tier interface, policies, allocator, leases, claims, "
                     "events, quotas", {"mmcache.common"}),
    "mmcache.tiers": ("host, disk, device and remote, each with its parts", {"mmcache.core", "mmcache.common"}),
    "mmcache.sidecar": ("mmcache serve: HTTP and Unix servers over one store", {"mmcache.core", "mmcache.tiers",
                                                                               "mmcache.common"}),
    "mmcache.ops": ("warm, export, import: a cache worked on from outside, through the SDK",
                    {"mmcache.common", "mmcache.stack"}),
    "mmcache.stack": ("mmcache up: spawn, supervise and stop a whole stack", {"mmcache.core", "mmcache.common"}),
    "llm_worker.engine": ("the language model: engine, KV slabs, prompts, sampling, batching", {"mmcache.common"}),
    "llm_worker.serve": ("the LLM worker process: its HTTP face and service", {"llm_worker.engine", "llm_worker.elastic",
                                                                              "mmcache.common"}),
    "llm_worker.elastic": ("role switching: elastic workers and the controller", {"llm_worker.engine", "llm_worker.serve",
                                                                                 "llm_worker.router", "mmcache.common"}),
    "llm_worker.router": ("the OpenAI front door across node groups", {"llm_worker.engine", "llm_worker.elastic",
                                                                       "mmcache.common"}),
    "llm_worker.planner": ("mmcache plan: costs, workloads, simulator, search", {"llm_worker.engine",
                                                                                 "llm_worker.elastic", "mmcache.common"}),
}
"""Each folder's job, and what it may import of its own package. ``mmcache.cli`` and
``llm_worker.cli`` (the commands) may import any folder of theirs."""
FOLDER_DEBTS = {
    # NOTE: mmcache up checks a --remote URL with the remote tier's own parser.
    "mmcache.stack.config": {"mmcache.tiers"},
}
"""Edges a folder's rule does not allow, listed one by one: debt to pay down, not to grow."""


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or ".".join(parts[:2]) in FOLDERS else None


def _broken(module: str, imported: str) -> str | None:
    top, target = module.split(".")[0], imported.split(".")[0]
    src, dst = _folder(module), _folder(imported)
    if src in FOLDERS and dst is not None and dst != src and dst.split(".")[0] == top:
        allowed = FOLDERS[src][1] | FOLDER_DEBTS.get(module, set())
        if dst not in allowed:
            return f"{src} ({FOLDERS[src][0]}) imports of {top} only {sorted(allowed) or 'nothing'}"
    if top == "mmcache_client" and target != "mmcache_client":
        return "the SDK imports nothing of the project"
    if top == "mmcache" and target in ("encoder_worker", "llm_worker"):
        return "mmcache imports no worker"
    if module.startswith("mmcache.common") and target == "mmcache" and not imported.startswith("mmcache.common"):
        return "mmcache.common imports nothing else of mmcache"
    if top in ("encoder_worker", "llm_worker") and target == "mmcache" and not imported.startswith("mmcache.common"):
        return "a worker uses only mmcache.common of mmcache"
    if top == "encoder_worker" and target == "llm_worker":
        return "the encoder imports no LLM worker"
    if top == "llm_worker" and target == "encoder_worker":
        allowed = LLM_USES_ENCODER.get(module, set())
        if not any(imported == a or imported.startswith(a + ".") for a in allowed):
            return f"llm_worker reaches encoder_worker only along {sorted(allowed) or 'no edge'}"
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    problems = [f"{module} imports {imp}: {why}" for imp in sorted(_imports(module, MODULES[module]))
                if (why := _broken(module, imp))]
    assert not problems, "\n".join(problems)


def test_every_folder_has_a_job():
    folders = {_folder(m) for m in MODULES if _folder(m) and m.split(".")[0] in ("mmcache", "llm_worker")}
    assert folders == set(FOLDERS), f"folders without a stated job or rule: {sorted(folders ^ set(FOLDERS))}"


def test_the_rule_catches_what_it_should():
    assert _broken("mmcache.tiers.host", "mmcache.sidecar.server")
    assert _broken("mmcache.core.events", "mmcache.tiers.host")
    assert _broken("mmcache.core.store", "mmcache.tiers.host")  # the store is handed its tiers (tiers.wiring)
    assert _broken("llm_worker.engine.engine", "llm_worker.router.router")
    assert _broken("mmcache.sidecar.server", "mmcache.tiers.host") is None
    assert _broken("mmcache.core.store", "encoder_worker.media")
    assert _broken("encoder_worker.service", "mmcache.core.store")
    assert _broken("mmcache_client.client", "mmcache.common")
    assert _broken("llm_worker.router.router", "encoder_worker.batcher")
    assert _broken("mmcache.common.app", "mmcache.core.store")
    assert _broken("encoder_worker.cli", "mmcache.common.app") is None
    assert len(MODULES) > 40


def test_no_module_imports_one_that_imports_it_back():
    """No import cycle, not even one made of type-only imports: a child gets what it uses, not
    its parent (the store hands its parts to the write-down, the router its pools and session to
    the role controller and its stats)."""
    graph = {m: {i for i in _imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}
    graph = {m: {i for i in deps if not MODULES[i].name == "__init__.py"} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_product_file_is_over_400_lines():
    """Small rooms: a file that grows past 400 lines is split where its concept splits."""
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"over 400 lines: {big}"
