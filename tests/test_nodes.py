"""``llm_worker.router.nodes``: node group specs, the inventory index the router keeps from the
sidecars' events, and the routing choice (cache-aware, by load where no group holds a byte)."""

from __future__ import annotations

import pytest

from llm_worker.router.backends import Pool
from llm_worker.router.nodes import Inventory, NodeGroup, NodeSpec, choose
from llm_worker.router.router import RouterConfig


def test_node_specs_parse_and_bad_ones_are_named():
    spec = NodeSpec.parse("name=a,cache=unix:///s.sock,encoder=http://e1,encoder=http://e2,prefill=http://p,decode=http://d")
    assert spec == NodeSpec("a", "unix:///s.sock", ("http://e1", "http://e2"), ("http://p",), ("http://d",))
    for bad, needle in [("cache=x,encoder=e,prefill=p,decode=d", "one name="),
                        ("name=a,encoder=e,prefill=p", "needs an encoder="),
                        ("name=a,colour=blue,encoder=e,prefill=p,decode=d", "colour"),
                        ("name=a,name=b,encoder=e,prefill=p,decode=d", "one name="),
                        ("name=a,encoder=,prefill=p,decode=d", "with a value")]:
        with pytest.raises(ValueError, match=needle):
            NodeSpec.parse(bad)
    with pytest.raises(ValueError, match="not both"):
        RouterConfig(nodes=(spec,), encoders=("http://e",))
    with pytest.raises(ValueError, match="must differ"):
        RouterConfig(nodes=(spec, spec))
    with pytest.raises(ValueError, match="routing"):
        RouterConfig(nodes=(spec,), routing="random")


def _groups(*names: str) -> list[NodeGroup]:
    return [NodeGroup(n, None, {"prefill": Pool("prefill", [f"http://{n}"], 1.0)}) for n in names]


def test_the_inventory_follows_stored_evicted_and_deleted_of_host_only():
    inv = Inventory()
    inv.apply("a", {"kind": "stored", "key": "ns/1", "tier": "host", "bytes": 100})
    inv.apply("b", {"kind": "stored", "key": "ns/1", "tier": "host", "bytes": 100})
    inv.apply("b", {"kind": "stored", "key": "ns/2", "tier": "host", "bytes": 500})
    inv.apply("a", {"kind": "stored", "key": "ns/3", "tier": "disk", "bytes": 900})  # not host: not indexed
    inv.apply("a", {"kind": "stored", "key": None, "tier": "host"})  # malformed: ignored
    assert inv.bytes_on(["ns/1", "ns/2", "ns/3"]) == {"a": 100, "b": 600}
    inv.apply("b", {"kind": "evicted", "key": "ns/2", "tier": "host", "bytes": 500})
    inv.apply("a", {"kind": "evicted", "key": "ns/1", "tier": "disk", "bytes": 100})  # disk eviction: host keeps it
    assert inv.bytes_on(["ns/1", "ns/2"]) == {"a": 100, "b": 100}
    inv.apply("a", {"kind": "deleted", "key": "ns/1", "tier": "all", "bytes": 0})
    assert inv.bytes_on(["ns/1"]) == {"b": 100}
    inv.forget("b")
    assert inv.bytes_on(["ns/1", "ns/2"]) == {} and inv.keys_on("b") == 0


def test_routing_goes_where_most_bytes_are_else_by_load():
    a, b, c = groups = _groups("a", "b", "c")
    inv = Inventory()
    inv.apply("b", {"kind": "stored", "key": "ns/big", "tier": "host", "bytes": 1000})
    inv.apply("c", {"kind": "stored", "key": "ns/small", "tier": "host", "bytes": 10})
    inv.apply("c", {"kind": "stored", "key": "ns/small2", "tier": "host", "bytes": 10})
    assert choose(groups, inv, ["ns/big", "ns/small", "ns/small2"], "cache") == (b, "cache")
    assert choose(groups, inv, ["ns/small"], "cache") == (c, "cache")
    a.active, b.active, c.active = 3, 1, 2
    assert choose(groups, inv, ["ns/unknown"], "cache") == (b, "load")
    assert choose(groups, inv, ["ns/small"], "load") == (b, "load")  # load-only ignores where bytes are
    assert choose(groups, inv, [], "cache") == (b, "load")
    b.active = 3
    a.counts["requests"] = 5
    assert choose(groups, inv, [], "cache") == (c, "load")
