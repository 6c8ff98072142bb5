"""``recoveryd demo`` and the local cluster it (and the end-to-end tests) run on."""
