"""Cluster targets of the Serve config: node pools, the KubeRay renderer, the strict
config linter, and the local fake multi-node autoscaling simulation.

- :mod:`cluster.pools`: the one table of node pools (KubeRay, fake cluster, Modal);
- :mod:`cluster.lint`: ``python -m cluster lint FILE``;
- :mod:`cluster.render`: Serve config + pools -> RayService and the ``k8s/`` tree;
- :mod:`cluster.fake_cluster` and :mod:`cluster.simulate`: the autoscaling lane.

``import cluster`` and ``cluster.pools`` load no Ray; the rest imports it lazily.
"""
