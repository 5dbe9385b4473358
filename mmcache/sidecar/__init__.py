"""The sidecar process (``mmcache serve``): its HTTP and Unix-socket servers over one store, its
config, listing, metrics, event hub and OpenAPI description."""
