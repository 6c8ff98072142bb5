"""The coordinator: membership, donor choice and recovery plans, served over gRPC.

Pure policy, plain data in and decisions out, with an injectable clock:
``membership.py`` (who is registered, health from heartbeats), ``policy.py``
(donor choice, plans, fences, why there is no donor), ``plans.py`` (a plan as
it runs, a joiner's round), ``planner.py`` (the state machine over rounds
and plans), ``census.py`` (the cluster counted once, for the metrics and for
``GetStatus``), ``config.py`` (:class:`CoordinatorConfig`). Above it, the
thin asyncio servicer (``service.py``: proto in, policy calls, proto out,
one error mapping) and the server's lifecycle (``server.py``: health,
reflection, graceful stop). The coordinator never imports the agent; both
speak :mod:`recoveryd.protocol`.
"""
