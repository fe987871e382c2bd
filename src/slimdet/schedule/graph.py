"""Operator graph with per-device costs, device constraints and transfer links.

An :class:`OpGraph` is a DAG of operators (or fused stages) in topological order. Each node has a
modelled time on every device (``inf`` where the device cannot run it: the constraint), and the
bytes of its output. Moving an output between two devices takes ``latency + bytes / bandwidth``
over their :class:`Link` (Hockney's alpha-beta model of a message, Parallel Computing 1994).

The shared result types (:class:`Device`, :class:`Stage`, :class:`Plan`) are used by the
partitioner, the throughput planner, the Gantt chart and the executor.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from slimdet.errors import ConfigError


@dataclass(frozen=True)
class Device:
    """A device that can run operators."""

    name: str  # "npu", "cpu", "gpu"
    kind: str  # "systolic" | "roofline" | "measured"


@dataclass(frozen=True)
class Stage:
    """A contiguous group of graph nodes on one device, in topological order."""

    device: str
    nodes: tuple[str, ...]
    time_s: float  # modelled compute time of the stage on its device


@dataclass(frozen=True)
class Plan:
    """A placement of a graph on devices with its modelled latency and throughput."""

    stages: tuple[Stage, ...]
    latency_s: float  # one frame, transfers included
    throughput_fps: float  # pipelined: 1 / slowest stage (transfers counted in the stage that sends)
    transfers: tuple[tuple[str, str, float], ...]  # (from device, to device, seconds)
    #: start of each stage within one frame when stages overlap (a DAG schedule); empty: the stages
    #: form a chain, each starting when the previous one and its transfer (``transfers[k]``) are done
    stage_start_s: tuple[float, ...] = ()

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices used, in order of first use."""
        return tuple(dict.fromkeys(s.device for s in self.stages))

    def to_dict(self) -> dict:
        """JSON-able form (times in ms for reading)."""
        return {"latency_ms": self.latency_s * 1e3, "throughput_fps": self.throughput_fps,
                "stages": [{"device": s.device, "nodes": list(s.nodes), "time_ms": s.time_s * 1e3}
                           for s in self.stages],
                "transfers": [{"from": a, "to": b, "time_ms": t * 1e3} for a, b, t in self.transfers],
                "stage_start_ms": [t * 1e3 for t in self.stage_start_s]}  # fmt: skip


@dataclass(frozen=True)
class Node:
    """One operator or fused stage of the graph."""

    name: str
    op: str = "op"  # "conv", "concat", "activation", "decode", "nms", "input", "block", ...
    inputs: tuple[str, ...] = ()
    out_bytes: float = 0.0  # its output, sent once to every other device that consumes it
    members: tuple[str, ...] = ()  # the original nodes a fused node stands for (empty: itself)


@dataclass(frozen=True)
class Link:
    """A transfer path between two devices: ``latency_s + bytes / bytes_per_s`` per message."""

    bytes_per_s: float
    latency_s: float = 0.0

    def time_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True, eq=False)
class OpGraph:
    """A DAG of :class:`Node` (inputs before users) with a cost per (node, device).

    Args:
        nodes: in topological order; ``inputs`` name earlier nodes.
        devices: the devices that may run them.
        cost_s: ``len(nodes) x len(devices)`` seconds, ``inf`` where a device cannot run a node.
        link: the default link between any two different devices.
        links: per ``(from, to)`` device-name pair, overriding ``link``.
    """

    nodes: tuple[Node, ...]
    devices: tuple[Device, ...]
    cost_s: np.ndarray
    link: Link = Link(bytes_per_s=4e9, latency_s=20e-6)
    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cost = np.asarray(self.cost_s, dtype=np.float64)
        object.__setattr__(self, "cost_s", cost)
        names = [d.name for d in self.devices]
        if not self.devices or len(set(names)) != len(names):
            raise ConfigError(f"schedule: devices must be distinct and non-empty, got {names}")
        if cost.shape != (len(self.nodes), len(self.devices)):
            raise ConfigError(f"schedule: cost_s must be {len(self.nodes)} x {len(self.devices)}, got {cost.shape}")
        if np.isnan(cost).any() or (cost < 0).any():
            raise ConfigError("schedule: costs must be >= 0 seconds (inf: unsupported)")
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.name in seen:
                raise ConfigError(f"schedule: node name {node.name!r} appears twice")
            missing = [p for p in node.inputs if p not in seen]
            if missing:
                raise ConfigError(f"schedule: node {node.name!r} reads {missing}, not defined before it "
                                  "(nodes must be in topological order)")  # fmt: skip
            if not np.isfinite(cost[i]).any():
                raise ConfigError(f"schedule: no device can run node {node.name!r} ({node.op}); devices: {names}")
            seen.add(node.name)
        for (a, b), ln in self.links.items():
            if a not in names or b not in names:
                raise ConfigError(f"schedule: link {a!r}->{b!r} names an unknown device; devices: {names}")
            if ln.bytes_per_s <= 0 or ln.latency_s < 0:
                raise ConfigError(f"schedule: link {a!r}->{b!r} needs bytes_per_s > 0 and latency_s >= 0")

    def __len__(self) -> int:
        return len(self.nodes)

    @cached_property
    def index(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.nodes)}

    @cached_property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @cached_property
    def preds(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(dict.fromkeys(self.index[p] for p in n.inputs)) for n in self.nodes)

    @cached_property
    def succs(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for j, ps in enumerate(self.preds):
            for i in ps:
                out[i].append(j)
        return tuple(tuple(s) for s in out)

    @cached_property
    def edges(self) -> tuple[tuple[int, int], ...]:
        return tuple((i, j) for j, ps in enumerate(self.preds) for i in ps)

    @cached_property
    def out_bytes(self) -> np.ndarray:
        return np.asarray([n.out_bytes for n in self.nodes], dtype=np.float64)

    @cached_property
    def supported(self) -> np.ndarray:
        """``n x D`` booleans: which device can run which node."""
        return np.isfinite(self.cost_s)

    @cached_property
    def link_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(latency_s, seconds per byte), ``D x D``, zero on the diagonal (no transfer)."""
        d = len(self.devices)
        lat, inv_bw = np.zeros((d, d)), np.zeros((d, d))
        for a in range(d):
            for b in range(d):
                if a != b:
                    ln = self.links.get((self.device_names[a], self.device_names[b]), self.link)
                    lat[a, b], inv_bw[a, b] = ln.latency_s, 1.0 / ln.bytes_per_s
        return lat, inv_bw

    def transfer_s(self, nbytes: float, src: int, dst: int) -> float:
        """Seconds to move ``nbytes`` from device ``src`` to device ``dst`` (0 on the same device)."""
        lat, inv_bw = self.link_matrices
        return 0.0 if src == dst else float(lat[src, dst] + nbytes * inv_bw[src, dst])

    def transfer_matrix(self, node: int) -> np.ndarray:
        """``D x D`` seconds to send ``node``'s output between every pair of devices."""
        lat, inv_bw = self.link_matrices
        return lat + self.nodes[node].out_bytes * inv_bw

    @property
    def is_chain(self) -> bool:
        """Every node reads only the node before it, and is read only by the node after it."""
        return all(p == ((i - 1,) if i else ()) for i, p in enumerate(self.preds)) and all(
            len(s) <= 1 for s in self.succs
        )

    def contract(self, group_of: Mapping[str, str], *, op: str = "block") -> OpGraph:
        """A graph with every set of nodes mapped to one group name fused into one node.

        The fused node costs the sum of its members on each device (``inf`` if any member cannot run
        there), sends the outputs its members send outside the group, and sits where its first member
        was. Nodes not in ``group_of`` stay as they are.

        Raises:
            ConfigError: a group that would make a cycle (not a contiguous part of the DAG).
        """
        key = [group_of.get(n.name, n.name) for n in self.nodes]
        order = list(dict.fromkeys(key))
        members: dict[str, list[int]] = {k: [] for k in order}
        for i, k in enumerate(key):
            members[k].append(i)
        cost = np.zeros((len(order), len(self.devices)))
        nodes: list[Node] = []
        for g, k in enumerate(order):
            idx = members[k]
            cost[g] = self.cost_s[idx].sum(axis=0)
            inputs = tuple(dict.fromkeys(key[p] for i in idx for p in self.preds[i] if key[p] != k))
            sent = sum(self.nodes[i].out_bytes for i in idx if any(key[j] != k for j in self.succs[i]))
            if len(idx) == 1 and k == self.nodes[idx[0]].name:
                nodes.append(Node(k, self.nodes[idx[0]].op, inputs, self.nodes[idx[0]].out_bytes,
                                  self.nodes[idx[0]].members))  # fmt: skip
            else:
                flat = tuple(m for i in idx for m in (self.nodes[i].members or (self.nodes[i].name,)))
                nodes.append(Node(k, op, inputs, float(sent), flat))
        # a group placed at its first member may read a later node: order the groups topologically
        return _reorder(nodes, cost, self)

    def summary(self) -> dict:
        """Sizes and per-device totals, for records and logs."""
        finite = np.where(self.supported, self.cost_s, 0.0)
        return {"nodes": len(self.nodes), "edges": len(self.edges), "chain": self.is_chain,
                "devices": {d.name: {"kind": d.kind, "supported_nodes": int(self.supported[:, k].sum()),
                                     "time_ms_supported": float(finite[:, k].sum() * 1e3)}
                            for k, d in enumerate(self.devices)}}  # fmt: skip


def _reorder(nodes: list[Node], cost: np.ndarray, like: OpGraph) -> OpGraph:
    """Kahn's algorithm, keeping the given order among ready nodes; a cycle is a clear error."""
    index = {n.name: i for i, n in enumerate(nodes)}
    indeg = [len(set(n.inputs)) for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for j, n in enumerate(nodes):
        for p in set(n.inputs):
            users[index[p]].append(j)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        done = set(order)
        stuck = next(n.name for i, n in enumerate(nodes) if i not in done)
        raise ConfigError(f"schedule: fusing makes a cycle through {stuck!r}")
    return OpGraph(tuple(nodes[i] for i in order), like.devices, cost[order], like.link, dict(like.links))


def plan_throughput_fps(device_load_s: Mapping[str, float]) -> float:
    """Frames per second of a pipeline whose devices are each busy ``load`` seconds per frame."""
    worst = max(device_load_s.values(), default=0.0)
    return math.inf if worst <= 0 else 1.0 / worst


def random_graph(rng: np.random.Generator, n: int, *, devices: int = 2, edge_prob: float = 0.4,
                 unsupported_prob: float = 0.15, ccr: float = 0.5, chain: bool = False) -> OpGraph:  # fmt: skip
    """A random DAG for tests and benchmarks, in the manner of HEFT's generator (Topcuoglu et al., 2002).

    Node ``i`` reads each earlier node with probability ``edge_prob`` (a chain: only ``i - 1``). Node
    work is U(1, 10) ms, scaled per device by a speed U(0.5, 2) and per (node, device) by U(0.5, 1.5);
    a (node, device) pair is unsupported with probability ``unsupported_prob`` (never all devices of
    a node). Output bytes make a transfer take ``ccr`` times the mean work on average (1 GB/s links,
    10 us latency).
    """
    work = rng.uniform(1e-3, 10e-3, n)
    speed = rng.uniform(0.5, 2.0, devices)
    cost = work[:, None] * speed[None, :] * rng.uniform(0.5, 1.5, (n, devices))
    unsupported = rng.random((n, devices)) < unsupported_prob
    unsupported[np.arange(n), rng.integers(0, devices, n)] = False
    cost[unsupported] = np.inf
    link = Link(bytes_per_s=1e9, latency_s=10e-6)
    mean_bytes = max(ccr * float(work.mean()) - link.latency_s, 0.0) * link.bytes_per_s
    nodes = []
    for i in range(n):
        if chain:
            inputs = (f"n{i - 1}",) if i else ()
        else:
            inputs = tuple(f"n{p}" for p in range(i) if rng.random() < edge_prob)
        nodes.append(Node(f"n{i}", "op", inputs, float(rng.uniform(0.0, 2.0) * mean_bytes)))
    devs = tuple(Device(f"dev{k}", "measured") for k in range(devices))
    return OpGraph(tuple(nodes), devs, cost, link)
