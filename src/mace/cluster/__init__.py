"""`mace serve --replicas N`: replicas of the whole server under Ray Serve, one port in front.

    launch.py    Ray, the deployment, the front end's lifetime (the only module `mace.cli` imports)
    replica.py   one replica: `mace serve`'s app on a private port, reached through a deployment handle
    front.py     the public port: tenant affinity, relaying, websockets, the fleet's /ready and /metrics
    registry.py  where each replica's private address is written, in the shared data dir

Importing this package does not import Ray; `launch.serve_cluster` does, and says so when it cannot.
"""

# Hop-by-hop headers (RFC 9110 section 7.6.1) and those a relay recomputes: never passed on.
NOT_RELAYED_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
                                 "content-length", "proxy-connection"})
