"""`pending_items` around a damaged record (a one-record frame whose payload fails, or a
several-records frame whose intact records are salvaged), found live or by recovery, must
say what is left to deliver: never 0 while records are left (the lane, `delivery.lane`,
waits while pending_items == 0: they would stay on disk until the next event arrives),
never above 0 once all that can be read was delivered (the lane would poll an empty queue
forever). A damaged record may count until it is read past."""

from __future__ import annotations

import pytest
from queue_helpers import flip_byte, payload_for, segment_files, seq_of

from traits_agent.queue import DiskQueue
from traits_agent.queue.framing import MAGIC, MAGIC_MANY

BIG = {"segment_bytes": 1 << 20, "max_bytes": 1 << 30}


@pytest.mark.parametrize("damaged", [2, 256], ids=["early_record", "last_record"])
@pytest.mark.parametrize("restart", [True, False], ids=["recovered", "live"])
@pytest.mark.parametrize("frames", ["several", "one"], ids=["append_many", "append"])
def test_pending_items_after_a_damaged_record(tmp_path, damaged, restart, frames) -> None:
    q = DiskQueue.open(tmp_path, **BIG)
    try:
        if frames == "several":
            assert q.append_many([payload_for(s) for s in range(1, 257)]) == 256  # 2 frames
        else:
            for s in range(1, 257):
                assert q.append(payload_for(s))
        q.flush()
        seg = segment_files(tmp_path)[0]
        data = seg.read_bytes()
        assert data[:4] == (MAGIC_MANY if frames == "several" else MAGIC)
        at = data.index(b"{%d:" % damaged)
        flip_byte(seg, at + 1, 0x01)  # a digit of the record's seq: its own CRC fails
        if restart:
            q.close()
            q = DiskQueue.open(tmp_path, **BIG)
        delivered: list[int] = []
        while (batch := q.read_batch(127, 1 << 20)) is not None:
            delivered += [seq_of(p) for p in batch.payloads]
            q.commit(batch)
            left = 256 - 1 - len(delivered)
            if delivered[-1] > damaged:  # read past: exact
                assert q.pending_items == left, f"after {delivered[-1]}"
            else:  # the damaged record may count until read past
                assert left <= q.pending_items <= left + 1, f"after {delivered[-1]}"
        assert delivered == [s for s in range(1, 257) if s != damaged]
        assert q.pending_items == 0
    finally:
        q.close()
