"""Giving a round again to an edge gateway that restarted in the middle of it.

What Flower 1.42 does when a SuperNode's work is killed mid-round (read from its source and
measured on loopback):

- The ClientApp runs in its own process (`flwr-clientapp`, started by the node's
  `flower-superexec`). Killed with -9, it stops renewing its task token; once the token
  expires (heartbeat 30 s, patience 2) the SuperNode answers the message with an error,
  `CLIENT_APP_CRASHED` (61 s after the kill, measured). The message is not given to a new
  ClientApp.
- The SuperNode itself (with its SuperExec and ClientApp), killed with -9, stops its
  heartbeats; the SuperLink answers its messages with `NODE_UNAVAILABLE` once its
  `online_until` passes (again up to about a minute). Restarted, a SuperNode without node
  authentication registers a fresh key pair and gets a *new node id* (seen in
  tests/test_edge_gateway.py); nothing addressed to the old id reaches it. (A node started with
  `--auth-supernode-private-key` activates under its registered key instead; not tried here.)

So Flower never gives a round to a restarted node: the round would lose the gateway and every
device update it had accepted. The ServerApp's edge rounds therefore go through this Grid:

- before a train round it asks each node it does not know yet what it is (a `query` message,
  answered by client_app.query: a gateway names itself);
- while the round runs, a node that appears and names itself as gateway G takes over G's
  unanswered train message: the same message goes to the new node at once, and the old
  node's delivery is abandoned (no waiting a minute for Flower to give up on it);
- a train message answered with `CLIENT_APP_CRASHED` goes to the same node again (the
  SuperNode starts a new ClientApp, which resumes the task: measured, the round then
  completed with each update once, about 70 s after the kill), one answered
  `NODE_UNAVAILABLE` to a newer node of the same gateway if there is one; at most
  `max_redeliveries` times per message.

The gateway resumes its task by (federation, round, name), so the devices' updates count once
(gateway.py), and the strategy keeps one answer per gateway a round (strategies.py).
Everything else (evaluation, other message types) passes through unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger("pollinate.federated")

RETRY_CODES = {ErrorCode.CLIENT_APP_CRASHED, ErrorCode.NODE_UNAVAILABLE}
POLL_SECONDS = 0.5
ROLL_CALL_SECONDS = 60.0  # before a round: how long unknown nodes may take to say what they are
LATE_ROLL_CALL_SECONDS = 20.0  # during a round, for a node that just appeared


@dataclass
class Delivery:
    message: Message
    node: int
    attempts: int = 1


class RedeliveringGrid(Grid):
    """A Grid that delivers train rounds to gateways across restarts (module docstring)."""

    def __init__(self, grid: Grid, *, max_redeliveries: int = 3, poll_seconds: float = POLL_SECONDS):
        self.grid = grid
        self.max_redeliveries = max_redeliveries
        self.poll_seconds = poll_seconds
        self.roles: dict[int, str] = {}  # node id -> gateway name ("" for any other node)
        self.current: dict[str, int] = {}  # gateway name -> the node that named itself so last
        self.redelivered = 0  # in the last train round

    # ------------------------------------------------------------ plain delegation

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return self._train_round(messages, timeout)

    # ------------------------------------------------------------ the roll call

    def roll_call(self, node_ids: Iterable[int], timeout: float) -> None:
        """Ask nodes not known yet what they are; silent or failing ones count as no gateway."""
        unknown = sorted({int(n) for n in node_ids} - set(self.roles))
        if not unknown:
            return
        queries = [Message(RecordDict({"config": ConfigRecord({"ask": "role"})}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in unknown]
        ids = {i: n for i, n in zip(self.grid.push_messages(queries), unknown) if i}
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(ids)):
                node = ids.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                record = None if reply.has_error() else reply.content.get("node")
                self.roles[node] = str(record.get("gateway", "")) if record is not None else ""
                if self.roles[node]:
                    self.current[self.roles[node]] = node
            if ids:
                time.sleep(min(0.2, self.poll_seconds))
        for node in ids.values():
            self.roles.setdefault(node, "")
        named = {n: g for n, g in self.roles.items() if n in unknown and g}
        if named:
            log.info("edge gateways: %s", ", ".join(f"{g} (node {n})" for n, g in sorted(named.items())))

    # ------------------------------------------------------------ a train round

    def _train_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        self.redelivered = 0
        self.roll_call({m.metadata.dst_node_id for m in messages}, min(ROLL_CALL_SECONDS, _left(deadline)))
        pending: dict[str, Delivery] = {}
        self._push(pending, self._address(messages))
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                delivery = pending.pop(reply.metadata.reply_to_message_id, None)
                if delivery is None:
                    continue
                if reply.has_error() and reply.error.code in RETRY_CODES and self._retry(pending, delivery, reply):
                    continue
                replies.append(reply)
            self._take_over(pending, deadline)
            if pending:
                time.sleep(self.poll_seconds)
        return replies

    def _address(self, messages: list[Message]) -> list[Delivery]:
        """One delivery per message, except to a gateway's old node (one that the same gateway
        replaced since: dead, or about to be declared so): its message goes to the new node,
        unless that node has one already."""
        addressed = {m.metadata.dst_node_id for m in messages}
        deliveries = []
        for message in messages:
            node = message.metadata.dst_node_id
            name = self.roles.get(node, "")
            newest = self.current.get(name, node) if name else node
            if newest == node:
                deliveries.append(Delivery(message, node))
            elif newest not in addressed:
                addressed.add(newest)
                deliveries.append(Delivery(Message(content=message.content, dst_node_id=newest,
                                                   message_type=message.metadata.message_type,
                                                   group_id=message.metadata.group_id or None), newest))
            else:
                log.info("gateway %s: node %s was replaced by node %s: no message for it", name, node, newest)
        return deliveries

    def _push(self, pending: dict[str, Delivery], deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        for message_id, delivery in zip(self.grid.push_messages([d.message for d in deliveries]), deliveries):
            if message_id:
                pending[message_id] = delivery

    def _resend(self, pending: dict[str, Delivery], delivery: Delivery, node: int, why: str) -> None:
        original = delivery.message
        again = Message(content=original.content, dst_node_id=node, message_type=original.metadata.message_type,
                        group_id=original.metadata.group_id or None)
        gateway = self.roles.get(delivery.node) or self.roles.get(node) or "?"
        config = original.content.get("config") if original.has_content() else None
        log.warning("round %s: gave gateway %s's train message again, to node %s (%s)",
                    config.get("server-round", "?") if config is not None else "?", gateway, node, why)
        self.redelivered += 1
        self._push(pending, [Delivery(again, node, delivery.attempts + 1)])

    def _retry(self, pending: dict[str, Delivery], delivery: Delivery, reply: Message) -> bool:
        """Give a message whose ClientApp or node died to the gateway again; False: nobody to give it to."""
        name = self.roles.get(delivery.node, "")
        if not name or delivery.attempts > self.max_redeliveries:
            return False
        online = set(self.grid.get_node_ids())
        busy = {d.node for d in pending.values()}
        if reply.error.code == ErrorCode.CLIENT_APP_CRASHED and delivery.node in online:
            self._resend(pending, delivery, delivery.node, "its ClientApp crashed")
            return True
        successor = self.current.get(name)
        if successor is not None and successor != delivery.node and successor in online and successor not in busy:
            self._resend(pending, delivery, successor, f"node {delivery.node} is gone")
            return True
        return False

    def _take_over(self, pending: dict[str, Delivery], deadline: float) -> None:
        """A gateway that came back on a new node takes over its unanswered message."""
        newcomers = set(self.grid.get_node_ids()) - set(self.roles)
        if not newcomers:
            return
        self.roll_call(newcomers, min(LATE_ROLL_CALL_SECONDS, _left(deadline)))
        for node in sorted(newcomers):
            name = self.roles.get(node, "")
            if not name:
                continue
            for message_id, delivery in list(pending.items()):
                if delivery.node != node and self.roles.get(delivery.node) == name:
                    del pending[message_id]  # the old node's delivery is abandoned
                    self._resend(pending, delivery, node, f"it came back as node {node}")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
