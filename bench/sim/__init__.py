"""The routing simulator's parts (``bench/routing_sim.py`` is its command line).

- ``trace``: Mooncake-format traces (arrival, lengths, prefix block ids) and the ideal hit
  ratio of one infinite cache;
- ``service``: the simulated truth of a worker's step times (a cost profile, noise, and the
  attention and KV-read terms the router's cost model does not have);
- ``worker``: one simulated worker (the engine's own ``BlockPool`` and ``KVEventLog``, a
  continuous-batching step loop) and the ``WorkerView`` the router's policies read;
- ``cluster``: the discrete-event loop that replays a trace through a real routing policy;
- ``report``: percentiles, fairness and the per-policy summary.

Plain Python: the router's policies and prefix index, the engine's block pool; no torch.
"""
