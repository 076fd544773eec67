"""A Flower Grid whose nodes are the project's real ClientApp functions in threads of this
process: the ServerApp's `run_federation`, the guarded strategy, the acceptance gate, the
publisher and the edge gateways run exactly as under a SuperLink, in seconds instead of the
half minute Flower's own processes take to start.

A node is its node config (what `pollinate federate supernode` writes): `{"gateway": NAME,
"home": ...}` for an edge gateway (its train message opens a task that devices fill over
HTTP, so each train message runs in its own thread), `{"partition-id": i, "num-partitions":
n}` for a simulated client. Clients share one cached Keras trainer per process, so their
messages run one at a time. Messages are copied before a node sees them, as the SuperLink
serialises them.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from federated import client_app


class ThreadGrid(Grid):
    def __init__(self, nodes: dict[int, dict]):
        self.nodes = nodes
        self._replies: dict[str, Message] = {}
        self._done = threading.Condition()
        self._clients = threading.Lock()  # non-gateway nodes share one trainer
        self._run = None
        # what the SuperLink's ServerApp process knows about itself (Message() reads it)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def get_nodes(self):
        return []

    def _answer(self, message_id: str, message: Message) -> None:
        node = message.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config=dict(self.nodes[node]), state=RecordDict(),
                          run_config={})
        handler = {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate,
                   MessageType.QUERY: client_app.query}[message.metadata.message_type.split(".")[0]]
        try:
            if "gateway" in self.nodes[node]:
                reply = handler(message, context)
            else:
                with self._clients:
                    reply = handler(message, context)
        except Exception as exc:  # what a SuperNode reports: an error reply
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        with self._done:
            self._replies[message_id] = reply
            self._done.notify_all()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            copied = Message(copy.deepcopy(message.content), message.metadata.dst_node_id,
                             message.metadata.message_type, ttl=message.metadata.ttl,
                             group_id=message.metadata.group_id)
            copied.metadata.__dict__["_message_id"] = message_id
            threading.Thread(target=self._answer, args=(message_id, copied), daemon=True).start()
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._done:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(list(messages)))
        out: list[Message] = []
        with self._done:
            while len(out) < len(ids):
                self._done.wait(timeout=0.5)
                out += [self._replies.pop(i) for i in list(self._replies) if i in ids]
        return out
