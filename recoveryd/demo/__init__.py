"""``recoveryd demo``, the local cluster it (and the end-to-end tests) run on, the example trainer.

``trainer.py`` is one rank of a small real training job with an agent (in
process or attached to a sidecar); ``cluster.py`` runs replicas of it as real
processes with a coordinator, kills and restarts them and gathers their
events; ``run.py`` is the demo itself; ``standalone.py`` is
``recoveryd example-trainer``, which the Kubernetes manifests run.
"""
