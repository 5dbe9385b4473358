"""The project's dependencies point one way (DESIGN.md "Layout"; docs/architecture.md):

    mmcache_client  <-  mmcache.serving  <-  mmcache (the sidecar)
          ^                   ^
          +--- encoder_worker, llm_worker (workers: the SDK and the serving helper only)

- the SDK imports nothing of the project;
- ``mmcache`` imports no worker (``mmcache up`` starts them by module name);
- ``mmcache.serving`` imports nothing else of ``mmcache``;
- the workers import of ``mmcache`` only ``mmcache.serving``;
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
    "llm_worker.service": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.app": {"encoder_worker.encoder", "encoder_worker.media", "encoder_worker.models",
                       "encoder_worker.video"},
    "llm_worker.config": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.router": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.router_app": {"encoder_worker.models"},
    "llm_worker.cli": {"encoder_worker.media", "encoder_worker.video"},
    "llm_worker.engine": {"encoder_worker.namespace"},
    # NOTE: the planner's profiler times the encoder the workers run, on the model they build.
    "llm_worker.plan_profile": {"encoder_worker.encoder", "encoder_worker.media", "encoder_worker.models"},
    # NOTE: an elastic worker holds the vision tower by definition (it switches between encode,
    # prefill and decode while serving): it runs the encoder's own service, batcher, config and
    # /v1/encode handler in process rather than a second copy of them.
    "llm_worker.elastic_app": {"encoder_worker.app", "encoder_worker.batcher", "encoder_worker.config",
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


def _broken(module: str, imported: str) -> str | None:
    top, target = module.split(".")[0], imported.split(".")[0]
    if top == "mmcache_client" and target != "mmcache_client":
        return "the SDK imports nothing of the project"
    if top == "mmcache" and target in ("encoder_worker", "llm_worker"):
        return "mmcache imports no worker"
    if module.startswith("mmcache.serving") and target == "mmcache" and not imported.startswith("mmcache.serving"):
        return "mmcache.serving imports nothing else of mmcache"
    if top in ("encoder_worker", "llm_worker") and target == "mmcache" and not imported.startswith("mmcache.serving"):
        return "a worker uses only mmcache.serving of mmcache"
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


def test_the_rule_catches_what_it_should():
    assert _broken("mmcache.store", "encoder_worker.media")
    assert _broken("encoder_worker.service", "mmcache.store")
    assert _broken("mmcache_client.client", "mmcache.serving")
    assert _broken("llm_worker.router", "encoder_worker.batcher")
    assert _broken("mmcache.serving.app", "mmcache.store")
    assert _broken("encoder_worker.cli", "mmcache.serving.app") is None
    assert len(MODULES) > 40
