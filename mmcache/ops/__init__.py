"""Operations on a cache from outside: ``mmcache warm`` (encode a list of media ahead of time),
``mmcache export`` and ``mmcache import`` (a portable folder of entries)."""
