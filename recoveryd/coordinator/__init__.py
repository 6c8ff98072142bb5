"""The coordinator: membership, donor choice and recovery plans, served over gRPC.

Pure policy (``membership``, ``donor``, ``planner``: plain data in, decisions
out, injectable clock) is kept apart from the thin asyncio servicer
(``service``) and the server's lifecycle (``server``).
"""
