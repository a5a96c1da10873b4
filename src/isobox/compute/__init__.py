"""Compute systems: one interface over the process, host (and later vm) backends.

The service (``service``) keeps the state machine and the state store; each running
container has a monitor process (``monitor``, started by the ``spawner`` zygote) that owns
its stdio, its log and its exit status, reached through ``monitor_client``. What a monitor
runs is a ``plan`` (``plan.json``). See ``docs/compute-service.md`` for the contracts.
Modules are imported on demand: nothing here.
"""
