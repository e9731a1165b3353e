"""The federation in one process, without Ray or a SuperLink: for debugging, profiling and tests.

:class:`InProcessGrid` is a Flower ``Grid`` whose ``send_and_receive`` calls the ClientApp
directly, one virtual node after the other, each with its own persistent ``Context`` (node config
``partition-id`` / ``num-partitions`` and ``state``), exactly as the simulation engine does. A
client exception becomes an error reply, as in Flower. Use :func:`simulate` (``flwr run``) for
real runs; this path skips only the transport.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_ERROR_CODE = 99


def wire_copy(msg: Message) -> Message:
    """The message as the other side receives it: serialised with Flower's protobuf and parsed back.

    Flower's own protocols rely on this: SecAgg+'s client mod edits the records it receives, so
    handing every node the same object would corrupt the messages of the nodes after it.
    """
    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


class InProcessGrid(Grid):
    """A Grid over ``num_nodes`` virtual nodes running ``client_app`` in this process.

    Args:
        client_app: The ClientApp (e.g. ``client.app.app``).
        run_config: The run config every node sees.
        num_nodes: Number of virtual nodes; node ``i`` gets ``partition-id = i``.
        node_configs: Optional per-node configs replacing the default ``partition-id`` ones.
        reply_hook: Optional ``f(reply) -> reply`` applied to every reply (tests use it to
            tamper with messages on the wire).
        clock: Seconds (default ``time.monotonic``). ``send_and_receive(timeout=T)`` keeps the
            deadline as if the nodes ran in parallel, as deployed hospitals do: a node whose call
            takes longer than ``T`` seconds of this clock replies too late and its reply is not
            returned. Tests pass a fake clock that an injected sleep advances.
    """

    def __init__(
        self,
        client_app: ClientApp,
        run_config: Mapping[str, Any],
        num_nodes: int,
        node_configs: list[dict[str, Any]] | None = None,
        reply_hook: Callable[[Message], Message] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_app = client_app
        self.reply_hook = reply_hook
        self.clock = clock
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=dict(cfg), state=RecordDict(),
                              run_config=dict(run_config))
            for i, cfg in enumerate(configs)
        }
        for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            if getattr(TaskIdentity, name) is None:  # messages created by strategies need an identity
                setattr(TaskIdentity, name, value)

    def set_run(self, run_id: int) -> None:  # noqa: D102 - Grid API, unused here
        raise NotImplementedError

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        """The virtual nodes' ids."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Run the ClientApp for every message in turn and collect the replies of the calls that
        took at most ``timeout`` seconds of :attr:`clock` (None = no deadline)."""
        replies = []
        for msg in messages:
            start = self.clock()
            msg = wire_copy(msg)  # as the transport delivers it: no object shared between nodes
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # noqa: BLE001 - Flower turns client exceptions into error replies
                reply = Message(Error(code=_ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if timeout is not None and self.clock() - start > timeout:
                continue  # finished after the deadline: the server no longer waits for it
            reply = wire_copy(reply)
            replies.append(self.reply_hook(reply) if self.reply_hook else reply)
        return replies


def run_inprocess(
    config_path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    reply_hook: Callable[[Message], Message] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Prepare an experiment like ``simulate`` and run it with an :class:`InProcessGrid`.

    ``reply_hook`` and ``clock`` are passed to the :class:`InProcessGrid`.

    Returns:
        The report's path.
    """
    from client.app import app as client_app
    from server.loop import FederatedServer
    from shared_model.config import from_run_config
    from simulation.experiment import prepare_run

    exp, run_dir = prepare_run(config_path, overrides, run_dir, resume)
    run_config = exp.run_config()
    grid = InProcessGrid(client_app, run_config, exp.simulation.num_supernodes, reply_hook=reply_hook, clock=clock)
    start = time.perf_counter()
    report = FederatedServer(from_run_config(run_config), run_config).run(grid)
    print(f"report: {report} ({time.perf_counter() - start:.1f} s)")
    return report
