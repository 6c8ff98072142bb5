"""The agent as a sidecar process: ``recoveryd agent`` and :func:`recoveryd.attach`.

``server.py`` is the daemon (one session, and one :class:`recoveryd.Agent`,
per attached trainer rank); ``client.py`` is the trainer's side
(:class:`~recoveryd.sidecar.client.Attachment`, a :class:`recoveryd.RankAgent`);
``share.py`` shares the trainer's storages without copies (shared memory,
CUDA IPC) and rebuilds its state over them in the sidecar; ``frames.py`` is
every request and reply between the two, typed, with one codec; ``wire.py``
moves frames and descriptors over the Unix socket under a deadline.
"""
