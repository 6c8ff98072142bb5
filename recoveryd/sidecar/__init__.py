"""The agent as a sidecar process: ``recoveryd agent`` and :func:`recoveryd.attach`.

``server.py`` is the daemon: it accepts connections from processes of its
uid (or allowed ones), at most ``max_sessions`` at once, and gives each a
:mod:`session` (the attach, checked by :mod:`admission` before anything
large is read, then one :class:`recoveryd.Agent` per attached trainer rank);
``config.py`` holds its knobs; ``trust.py`` the checks on who attaches (peer
credentials, the attach token, whether a rank's holder still lives). ``client.py`` is the
trainer's side (:class:`~recoveryd.sidecar.client.Attachment`, a
:class:`recoveryd.RankAgent`) over a :mod:`channel` that keeps the session
alive. ``share.py`` shares the trainer's storages without copies (shared
memory, CUDA IPC) and rebuilds its state over them in the sidecar, in
sealed memfds that the trainer cannot shrink (``seal.py``); ``frames.py``
is every request and reply between the two, typed, with one codec;
``wire.py`` moves frames and descriptors over the Unix socket under a
deadline and within the limits the receiver set.
"""
