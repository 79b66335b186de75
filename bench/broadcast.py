"""Step-input broadcast to the workers: ZMQ PUB/SUB against a shared-memory ring.

The engine core sends every step's `StepInput` to all workers and waits for the driver's
output. This measures that path alone: the core encodes a decode-step `StepInput` of
--batch-size running requests, broadcasts it to --workers processes, each decodes it and
acknowledges, and the core waits for every acknowledgement. Median and p99 round trip
over --iters steps, for:

- zmq: XPUB/SUB over ipc (what executor/mp.py does), acks over PUSH/PULL;
- shm: a shared-memory ring (one writer, a sequence counter per slot, readers spin on
  it), acks as per-reader counters in the same segment, also spun on.

    python bench/broadcast.py --workers 1 2 4 --batch-size 256 [--iters 2000]

Spinning readers hold a core each; on a machine with fewer cores than workers + 1 the
ring loses to sockets, which block. Both numbers go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.messages import RunningRequest, StepInput  # noqa: E402

SLOTS = 8
SLOT_BYTES = 1 << 20
HEADER = 64  # per slot: int64 sequence number, int64 payload length (cache-line padded)


def decode_step(batch: int, step_id: int) -> StepInput:
    running = [RunningRequest(f"req-{i}", [step_id] if i % 16 == 0 else [], 100 + step_id)
               for i in range(batch)]  # fmt: skip
    return StepInput(step_id, running=running, num_scheduled_tokens={r.req_id: 1 for r in running})


# ---- zmq ---------------------------------------------------------------------------------
def zmq_reader(pub: str, ack: str, iters: int) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub)
    push = ctx.socket(zmq.PUSH)
    push.connect(ack)
    push.send(b"ready")
    dec = StepInputDecoder()
    for _ in range(iters):
        dec(sub.recv(copy=False).buffer)
        push.send(b"")
    ctx.destroy(linger=0)


def run_zmq(workers: int, batch: int, iters: int) -> list[float]:
    ctx = zmq.Context()
    folder = tempfile.mkdtemp()
    pub_addr, ack_addr = f"ipc://{folder}/pub", f"ipc://{folder}/ack"
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    pub.bind(pub_addr)
    pull = ctx.socket(zmq.PULL)
    pull.bind(ack_addr)
    procs = [
        mp.Process(target=zmq_reader, args=(pub_addr, ack_addr, iters)) for _ in range(workers)
    ]
    for p in procs:
        p.start()
    for _ in range(workers):
        pub.recv()  # a subscription
        pull.recv()  # ready
    enc = msgspec_encoder()
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        pub.send(enc(decode_step(batch, i)))
        for _ in range(workers):
            pull.recv()
        times.append(time.perf_counter() - t0)
    for p in procs:
        p.join()
    ctx.destroy(linger=0)
    return times


# ---- shared-memory ring -----------------------------------------------------------------
def _views(buf, workers: int):
    slots = [
        np.ndarray((2,), np.int64, buf, offset=i * (HEADER + SLOT_BYTES)) for i in range(SLOTS)
    ]
    acks = np.ndarray((workers * 8,), np.int64, buf, offset=SLOTS * (HEADER + SLOT_BYTES))
    return slots, acks


def shm_reader(name: str, index: int, workers: int, iters: int) -> None:
    shm = shared_memory.SharedMemory(name=name)
    slots, acks = _views(shm.buf, workers)
    dec = StepInputDecoder()
    for seq in range(1, iters + 1):
        head = slots[seq % SLOTS]
        while head[0] != seq:  # spin: the writer bumps the sequence last
            pass
        start = (seq % SLOTS) * (HEADER + SLOT_BYTES) + HEADER
        dec(shm.buf[start : start + int(head[1])])
        acks[index * 8] = seq  # one cache line per reader
    del slots, acks
    shm.close()


def run_shm(workers: int, batch: int, iters: int) -> list[float]:
    size = SLOTS * (HEADER + SLOT_BYTES) + workers * 64
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        slots, acks = _views(shm.buf, workers)
        slots_arr = [s for s in slots]
        for s in slots_arr:
            s[:] = 0
        acks[:] = 0
        procs = [
            mp.Process(target=shm_reader, args=(shm.name, r, workers, iters))
            for r in range(workers)
        ]
        for p in procs:
            p.start()
        enc = msgspec_encoder()
        times = []
        for seq in range(1, iters + 1):
            t0 = time.perf_counter()
            data = enc(decode_step(batch, seq - 1))
            start = (seq % SLOTS) * (HEADER + SLOT_BYTES) + HEADER
            shm.buf[start : start + len(data)] = data
            slots_arr[seq % SLOTS][1] = len(data)
            slots_arr[seq % SLOTS][0] = seq
            for r in range(workers):
                while acks[r * 8] != seq:
                    pass
            times.append(time.perf_counter() - t0)
        for p in procs:
            p.join()
        del slots, slots_arr, acks
    finally:
        shm.close()
        shm.unlink()
    return times


def msgspec_encoder():
    import msgspec

    return msgspec.msgpack.Encoder().encode


class StepInputDecoder:
    def __init__(self) -> None:
        import msgspec

        self._dec = msgspec.msgpack.Decoder(StepInput)

    def __call__(self, data) -> StepInput:
        return self._dec.decode(data)


def summarize(kind: str, workers: int, batch: int, times: list[float]) -> dict:
    times = sorted(times[len(times) // 10 :])  # drop the warm-up tenth
    return {
        "transport": kind,
        "workers": workers,
        "batch_size": batch,
        "message_bytes": len(msgspec_encoder()(decode_step(batch, 0))),
        "median_us": round(1e6 * statistics.median(times), 1),
        "p99_us": round(1e6 * times[int(0.99 * (len(times) - 1))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    mp.set_start_method("spawn")
    rows = []
    for n in args.workers:
        for kind, run in (("zmq", run_zmq), ("shm", run_shm)):
            rows.append(summarize(kind, n, args.batch_size, run(n, args.batch_size, args.iters)))
            print(json.dumps(rows[-1]), flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
