"""The sidecar's HTTP API as an OpenAPI 3.1 document (``GET /openapi.json``).

Written by hand, next to the routes it describes (``mmcache.sidecar.server.create_app``); a test holds the
two together (every route described, every described route served) so that it stays true.
"""

from __future__ import annotations

from typing import Any

from mmcache.sidecar.common import MAX_KEYS_PER_CALL

_NS = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}
_HASH = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_KEY = {"type": "string", "description": "namespace/hash (a tenant's token scopes it; the sidecar's own token may "
                                        "name tenant@namespace/hash)",
        "pattern": "^([A-Za-z0-9._-]{1,64}@)?[A-Za-z0-9._-]{1,128}/[0-9a-f]{64}$"}
_KEYS = {"type": "array", "items": _KEY, "maxItems": MAX_KEYS_PER_CALL}
_ERROR = {"description": "", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_RETRY = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}


def _error(description: str, retry: bool = False) -> dict:
    out = {**_ERROR, "description": description}
    if retry:
        out["headers"] = _RETRY
    return out


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


_COMMON = {"401": _error("a token is configured and the request has none, or a wrong one")}
_ENTRY_PARAMS = [{"name": "ns", "in": "path", "required": True, "schema": _NS},
                 {"name": "hash", "in": "path", "required": True, "schema": _HASH}]
_TENANT_HEADER = {"name": "X-MMCache-Tenant", "in": "header", "required": False,
                  "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
                  "description": "the tenant whose entry a tenant@ns key names (the sidecar's own token only)"}
_SAFETENSORS = {"application/vnd.safetensors": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def openapi_document() -> dict[str, Any]:
    entry = {
        "parameters": [*_ENTRY_PARAMS, _TENANT_HEADER],
        "put": {"summary": "Store an entry (a safetensors body with an `embeddings` tensor)",
                "parameters": [{"name": "durable", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
                               {"name": "persist", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}}],
                "requestBody": {"required": True, "content": _SAFETENSORS},
                "responses": {"201": {"description": "created"}, "200": {"description": "existed (the first is kept)"},
                              "400": _error("bad key or body: nothing stored"),
                              "403": _error("not this token's tenant"),
                              "413": _error("over --max-entry-size"),
                              "503": _error("no room now", retry=True), **_COMMON}},
        "get": {"summary": "The entry (safetensors)",
                "responses": {"200": {"description": "the entry", "headers": {
                    "X-MMCache-Tier": {"schema": {"type": "string", "enum": ["device", "host", "disk", "remote"]}}},
                    "content": _SAFETENSORS},
                    "400": _error("bad key"), "403": _error("not this token's tenant"), "404": _error("a miss"),
                    **_COMMON}},
        "head": {"summary": "Whether the entry exists",
                 "responses": {"200": {"description": "it exists"}, "404": {"description": "a miss"},
                               "400": {"description": "bad key"}, "403": {"description": "not this token's tenant"},
                               "401": {"description": "no or a wrong token"}}},
        "delete": {"summary": "Remove the entry from every tier",
                   "responses": {"204": {"description": "deleted"}, "404": _error("a miss"), "400": _error("bad key"),
                                 "403": _error("not this token's tenant"), **_COMMON}},
    }
    keys_body = {"type": "object", "required": ["keys"], "properties": {"keys": _KEYS, "detail": {"type": "boolean"}}}
    too_many = _error(f"more than {MAX_KEYS_PER_CALL} keys, or a body over 4 MiB")
    paths: dict[str, Any] = {
        "/v1/entries/{ns}/{hash}": entry,
        "/v1/entries": {"get": {
            "summary": "One page of the entries this token may see, in key order",
            "parameters": [{"name": "namespace", "in": "query", "schema": _NS},
                           {"name": "after", "in": "query", "schema": {"type": "string", "maxLength": 300}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "entries": {"type": "array", "items": {"type": "object"}}, "next": {"type": ["string", "null"]}}}),
                "400": _error("a bad parameter"), **_COMMON}}},
        "/v1/lookup": {"post": {
            "summary": "Which keys exist, and in which tier", "requestBody": {"required": True, **_json(keys_body)},
            "responses": {"200": _json({"type": "object"}), "400": _error("bad keys or body"), "413": too_many,
                          **_COMMON}}},
        "/v1/batch_get": {"post": {
            "summary": "The found entries as one Arrow IPC stream (key, tier, entry), in bounded memory",
            "requestBody": {"required": True, **_json({**keys_body, "properties": {
                **keys_body["properties"], "promote": {"type": "boolean"}}})},
            "responses": {"200": {"description": "an Arrow IPC stream",
                                  "content": {"application/vnd.apache.arrow.stream": {"schema": {"type": "string",
                                                                                                 "format": "binary"}}}},
                          "400": _error("bad keys or body"), "413": too_many, **_COMMON}}},
        "/v1/claims": {"post": {
            "summary": "Claim keys before encoding them (exists / won / wait), each new image encoded once",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["keys", "owner"], "properties": {
                "keys": _KEYS, "owner": {"type": "string", "minLength": 1, "maxLength": 128},
                "ttl_ms": {"type": "integer", "minimum": 1, "maximum": 600000}}})},
            "responses": {"200": _json({"type": "object", "properties": {"claims": {"type": "object"}}}),
                          "400": _error("bad keys, owner or ttl"), "413": too_many,
                          "429": _error("--max-claims or --max-claims-per-owner reached", retry=True), **_COMMON}}},
        "/v1/claims/release": {"post": {
            "summary": "Give an owner's claims back",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["keys", "owner"], "properties": {
                "keys": _KEYS, "owner": {"type": "string", "minLength": 1, "maxLength": 128}}})},
            "responses": {"200": _json({"type": "object", "properties": {"released": {"type": "integer"}}}),
                          "400": _error("bad keys or owner"), "413": too_many, **_COMMON}}},
        "/v1/events": {"get": {
            "summary": "Inventory events (stored / evicted / deleted) as server-sent events",
            "parameters": [{"name": "since", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                           {"name": "scope", "in": "query", "schema": {"type": "string", "enum": ["all", "local"]}}],
            "responses": {"200": {"description": "the stream (each event's data a JSON object)",
                                  "content": {"text/event-stream": {"schema": {}}}},
                          "400": _error("a bad parameter"),
                "429": _error("--max-event-followers reached", retry=True), **_COMMON}}},
        "/v1/stats": {"get": {"summary": "Per tier: entries, bytes, capacity, hits, misses, evictions; and more",
                              "responses": {"200": _json({"type": "object"}), **_COMMON}}},
        "/metrics": {"get": {"summary": "Prometheus text",
                             "responses": {"200": {"description": "metrics",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **_COMMON}}},
        "/healthz": {"get": {"summary": "Liveness (no token needed)", "security": [],
                             "responses": {"200": _json({"type": "object"})}}},
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": _json({"type": "object"}), **_COMMON}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mmcache sidecar", "version": "1",
                 "description": "A multimodal embedding cache: entries are safetensors blobs keyed namespace/hash."},
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
