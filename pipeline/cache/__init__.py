"""The driver side of ``actcache cache``: everything a caching run does outside the workers.

``driver`` orchestrates a run (``run_job``, ``load_job``); beside it, job files
(``jobfile``), the inputs read and hashed (``inputs``, ``media_inputs``), the plan of
work units (``plan``), the store created, checked and grown (``create``, ``lifecycle``),
its lease (``lease``), resources and fit (``fit``), the actor pool (``pool``) and the
in-process worker (``wiring``), the Ray session and its log (``raysession``, ``runlog``),
progress, ``--dry-run`` (``dryrun``), run records (``runrecord``) and ``info --verify``
(``verify``).

Nothing is re-exported here: importing this package stays free of zarr, torch and ray,
and callers name the module they use (``actcache.cache.driver``); the public entry
points are ``actcache.run_job`` and ``actcache.load_job``.
"""
