"""RequestStream: a consumer that fell behind gets the queued updates merged, in order."""

import asyncio

import pytest

from jaxpaged.server.engine_client import EngineDeadError
from jaxpaged.server.request_stream import OutputDelta, RequestStream, RequestUpdate


class _Owner:
    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


def _update(texts, finished=False, finish=None, start=0):
    outs = [OutputDelta(i, t, [start + i * 100 + j for j in range(len(t))], None, finish if finished else None, None)
            for i, t in enumerate(texts) if t is not None]
    return RequestUpdate("r", 5, outs, finished)


def test_queued_updates_are_merged_in_order_and_errors_come_after():
    async def run():
        owner = _Owner()
        stream = RequestStream(owner, "r", asyncio.get_running_loop())
        stream._put(_update(["ab", "x"]))
        stream._put(_update(["c", None], start=2))
        stream._put(_update(["d", "y"], start=3))
        stream._put(EngineDeadError("boom"))
        got = []
        with pytest.raises(EngineDeadError):
            async for update in stream:
                got.append(update)
        return owner, stream, got

    owner, stream, got = asyncio.run(run())
    assert len(got) == 1  # three queued updates arrive as one
    (merged,) = got
    assert [(d.index, d.text) for d in merged.outputs] == [(0, "abcd"), (1, "xy")]
    assert merged.outputs[0].token_ids == [0, 1, 2, 3] and merged.outputs[1].token_ids == [100, 3 + 100]
    stream.close()
    assert owner.aborted == []  # the error ended it; nothing left to abort


def test_finished_update_ends_iteration_and_close_aborts_unfinished():
    async def run():
        owner = _Owner()
        done = RequestStream(owner, "a", asyncio.get_running_loop())
        done._put(_update(["hi"]))
        done._put(_update(["!"], finished=True, finish="length", start=2))
        updates = [u async for u in done]
        done.close()
        pending = RequestStream(owner, "b", asyncio.get_running_loop())
        pending.close()
        pending.close()
        return owner, updates

    owner, updates = asyncio.run(run())
    assert updates[-1].finished and updates[-1].outputs[0].finish_reason == "length"
    assert "".join(d.text for u in updates for d in u.outputs) == "hi!"
    assert owner.aborted == ["b"]
