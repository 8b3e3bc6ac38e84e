"""Root's own machinery: its files, detached processes, the VM runners, the ports, keys and the egress filter.

Imports nothing else of the takeover's but `errors` and `models`: the steps, the guest and the
agent's side build on it, never the other way round.
"""
