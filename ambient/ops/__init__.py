"""The operator side of ``ambientctl``: one module per verb family.

- ``targets``: reaching ztunnel admin endpoints (a URL, a node of a local cluster, or a dump
  file) and the local cluster's state;
- ``zconfig``: ``ztunnel-config`` (tables over a config dump);
- ``dumpstate`` and ``explain``: ``policy explain`` (the authorization evaluator's trace over a
  config dump);
- ``tap``: ``tap`` (merged live connection events from several ztunnels);
- ``precheck``: ``precheck`` (node and cluster readiness checks);
- ``objects``: ``enroll``/``unenroll`` and ``waypoint`` against Kubernetes or a local cluster;
- ``cli``: the argparse wiring ``ambient.cli`` delegates to.

Every formatter and decision here is a pure function over data (dumps, system views,
objects), tested with tables; the I/O edges are thin.
"""
