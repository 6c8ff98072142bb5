"""The agent as a sidecar process: ``recoveryd agent`` and :func:`recoveryd.attach`."""
