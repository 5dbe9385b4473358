"""What every server of the project shares, and all that the workers may use of ``mmcache``.

- ``app``: ``run_app`` (bind, ready line, bounded connections and header time, graceful stop);
- ``http_limits``: bounded request bodies and answers (``read_body``, ``read_json``, ``PinnedWriter``);
- ``security``: tokens from the environment or a file, bearer checks, loopback, private dirs;
- ``tenants``: the token → tenant file and the scope a tenant's keys get;
- ``sizes``: ``4GiB``-style sizes.

The sidecar (``mmcache.sidecar.server``) builds on it too. Nothing here imports the cache (store, tiers),
and the workers import nothing else of ``mmcache`` (``tests/test_layering.py`` checks it), so a
worker can be deployed, read and changed without the sidecar's internals.
"""

from mmcache.common.app import bind, metrics_response, run_app, url_of

__all__ = ["bind", "metrics_response", "run_app", "url_of"]
