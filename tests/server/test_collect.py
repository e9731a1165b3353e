"""send_and_collect: the deadline as a message time-to-live, the nodes without a reply, polling."""

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from server.collect import send_and_collect
from simulation.inprocess import InProcessGrid


class ScriptedGrid(Grid):
    """A grid whose node ``n`` replies ``delays[n]`` seconds (fake clock) after the push; None = never."""

    def __init__(self, delays: dict[int, float | None], clock, superlink_errors: dict[int, int] | None = None) -> None:
        self.delays, self.clock, self.pushed, self.pulls = delays, clock, [], 0
        self.superlink_errors = superlink_errors or {}  # node -> error code the SuperLink answers with

    def set_run(self, run_id):  # noqa: D102
        raise NotImplementedError

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self):  # noqa: D102
        return list(self.delays)

    def push_messages(self, messages):
        self.pushed = list(messages)
        self.start = self.clock()
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for i, msg in enumerate(self.pushed):
            delay = self.delays[msg.metadata.dst_node_id]
            if f"m{i}" in message_ids and delay is not None and self.clock() - self.start >= delay:
                code = self.superlink_errors.get(msg.metadata.dst_node_id)
                reply = Message(RecordDict(), reply_to=msg) if code is None else \
                    Message(Error(code=code, reason="Flower's words"), reply_to=msg)
                if code is not None:  # made by the SuperLink, not by the node
                    reply.metadata.__dict__["_src_node_id"] = 1
                reply.metadata.__dict__["_reply_to_message_id"] = f"m{i}"
                out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        raise AssertionError("send_and_collect must push and pull itself")


def _messages(nodes):
    InProcessGrid(None, {}, 1)  # sets Flower's task identity, which new messages need
    return [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="train") for n in nodes]


def test_missing_nodes_are_those_without_a_reply_before_the_deadline():
    now = [0.0]
    grid = ScriptedGrid({1: 0.5, 2: 3.0, 3: None, 4: 9.5}, lambda: now[0])
    out = send_and_collect(grid, _messages([1, 2, 3, 4]), timeout=10.0, poll_interval=1.0,
                           clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert sorted(r.metadata.src_node_id for r in out.replies) == [1, 2, 4]
    assert out.missing == [3] and out.sent == [1, 2, 3, 4]
    assert out.unreplied == [(3, "timeout", "no reply before the deadline (reply-timeout 10 s)")]
    assert all(m.metadata.ttl == 10.0 for m in grid.pushed)  # expires in the SuperLink at the deadline
    assert out.seconds == 10.0


def test_all_replies_in_ends_the_wait_early():
    now = [0.0]
    grid = ScriptedGrid({1: 0.1, 2: 0.3}, lambda: now[0])
    out = send_and_collect(grid, _messages([1, 2]), timeout=3600.0, poll_interval=0.2,
                           clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert out.missing == [] and len(out.replies) == 2 and out.seconds < 1.0 and grid.pulls <= 3


def test_superlink_error_replies_are_dropped_for_the_node_they_stand_for():
    now = [0.0]
    codes = {2: ErrorCode.MESSAGE_UNAVAILABLE, 3: ErrorCode.NODE_UNAVAILABLE}
    grid = ScriptedGrid({1: 0.1, 2: 5.0, 3: 1.0}, lambda: now[0], codes)
    out = send_and_collect(grid, _messages([1, 2, 3]), timeout=5.0, poll_interval=1.0,
                           clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert [r.metadata.src_node_id for r in out.replies] == [1]
    assert out.unreplied == [
        (2, "timeout", "no reply before the deadline (reply-timeout 5 s); Flower: Flower's words"),
        (3, "error", "node unavailable; Flower: Flower's words"),
    ]
