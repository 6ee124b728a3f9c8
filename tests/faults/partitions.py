"""A 3-node cluster (``deploy/nats/node.conf``) with a TCP proxy on every route between two nodes
and in front of every node's client port, so one node can be cut off from the others and from
the clients: a network partition the fault run controls."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.integration.cluster import NODE_CONF, Cluster, Node, free_ports

from .proxy import Proxies


class PartitionableCluster(Cluster):
    """`Cluster`, every path to a node through a proxy of its group (the node's name)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "node.conf"
        # Servers must not tell clients each other's own addresses, or they would reconnect
        # around the proxies when one node is cut off.
        text = NODE_CONF.read_text().replace("cluster {\n", "cluster {\n  no_advertise: true\n", 1)
        conf.write_text(text)
        shutil.copy(NODE_CONF.parent / "accounts.conf", root / "accounts.conf")
        super().__init__(root, conf=conf)
        names = list(self.nodes)
        pairs = [(a, b) for a in names for b in names if a != b]
        ports = free_ports(len(pairs) + len(names))
        self._route_proxies = dict(zip(pairs, ports, strict=False))
        self._client_proxies = dict(zip(names, ports[len(pairs) :], strict=True))
        self.proxies = Proxies()
        for (a, b), port in self._route_proxies.items():
            self.proxies.add(port, self.nodes[b].route_port, a, b)
        for name, port in self._client_proxies.items():
            self.proxies.add(port, self.nodes[name].client_port, name)

    @property
    def client_urls(self) -> list[str]:
        """Where clients reach the nodes: through the proxies."""
        return [f"nats://127.0.0.1:{port}" for port in self._client_proxies.values()]

    def route_url(self, node: Node, peer: Node) -> str:
        if node.name == peer.name:
            return super().route_url(node, peer)
        return f"nats-route://127.0.0.1:{self._route_proxies[(node.name, peer.name)]}"

    def partition(self, name: str) -> None:
        """Cut node ``name`` off from the other nodes and from every client."""
        self.proxies.cut(name)

    def heal(self, name: str) -> None:
        self.proxies.heal(name)

    def stop(self) -> None:
        super().stop()
        self.proxies.close()
