"""The node side: the worker, one long-lived Python process per node (one per GPU with ``workers_per_node``).

The client ships its own copy of ``sky_jupyter`` to nodes and starts this package there, so it imports only the
standard library, cloudpickle, its own modules and the few modules it shares with the client, which keep the
same rule: ``sky_jupyter.protocol`` (the wire format and the handshake's checks), ``sky_jupyter.errors`` (what
protocol raises), ``sky_jupyter.info`` (``sky.instance_info()`` for remote code) and ``sky_jupyter.store`` (the
pool's shared collections, hosted by the head worker), plus what ``import
sky_jupyter`` itself loads. IPython is imported in :mod:`.cells` only when a notebook cell runs, and only where
the node has it. ``tests/test_worker_boundary.py`` enforces this.

- :mod:`.start`: ``python -m sky_jupyter.worker``: the configuration, the listening socket, the READY line,
  leaving the SSH session;
- :mod:`.server`: the :class:`~.server.Worker`: connections, the job loop, interrupts, restarts, the dead-man
  switch;
- :mod:`.handshake`: the worker's half of the mutual authentication;
- :mod:`.outbox`: frames for the client, held across reconnects until acknowledged;
- :mod:`.share`: a payload several workers of the node need, received once and copied for the others;
- :mod:`.output`: what tasks print, to the client; the worker's own log;
- :mod:`.cells`: notebook cells in the node's persistent namespace;
- :mod:`.watchdog`: ``python -m sky_jupyter.worker.watchdog``, one per pool per node beside the workers when the
  provider asks (AWS): powers the node off when the client's heartbeat stops, even with every worker dead or hung,
  and watches the instance metadata for spot reclaim notices.
"""
