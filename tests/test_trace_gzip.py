"""ParallelGzip (trace/io.py): the gzip writer of every .gz trace, deflating blocks in helper threads."""
from __future__ import annotations

import gzip
import io
import random
import threading
import zlib

import pytest

from moe_trace.errors import TraceError
from moe_trace.trace import io as trace_io
from moe_trace.trace.io import ParallelGzip, atomic_write


def _events(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    return b",\n".join(b'{"ph":"X","cat":"kernel","name":"void kernel_%d","pid":0,"tid":7,"ts":%d.%03d,"dur":%d}'
                       % (rnd.randrange(300), i * 3, rnd.randrange(1000), rnd.randrange(90)) for i in range(n))


def _parallel(parts, threads=None, level=3) -> bytes:
    out = io.BytesIO()
    z = ParallelGzip(out, level, threads)
    for p in parts:
        z.write(p)
    z.close()
    return out.getvalue()


def _gzipfile(data: bytes, level=3) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0) as g:
        g.write(data)
    return out.getvalue()


def test_one_gzip_member_whatever_the_sizes_splits_and_threads():
    block = trace_io.GZ_BLOCK  # 16 KB in the tests (conftest)
    data = _events(6000)
    assert len(data) > 20 * block
    for size in (0, 1, 100, block - 1, block, block + 1, 3 * block, len(data)):
        d = data[:size]
        outs = set()
        for threads in (1, 3):
            for split in (1, 777, block, 10 ** 9):
                parts = [d[i:i + split] for i in range(0, len(d), split)] or [b""]
                got = _parallel(parts, threads)
                outs.add(got)
                assert gzip.decompress(got) == d
                inflate = zlib.decompressobj(31)  # one member: nothing after its trailer
                assert inflate.decompress(got) == d and inflate.eof and inflate.unused_data == b""
        assert len(outs) == 1, f"the bytes depend on the writes' split or the threads at size {size}"
        assert got[:10] == _gzipfile(d)[:10]  # GzipFile's header: no name, mtime 0


@pytest.mark.parametrize("level", [1, 3, 9])
def test_compresses_as_well_as_gzipfile(level, monkeypatch):
    monkeypatch.setattr(trace_io, "GZ_BLOCK", 256 << 10)  # a quarter of the real block
    data = _events(40000, seed=level)
    got = _parallel([data[i:i + 5000] for i in range(0, len(data), 5000)], level=level)
    assert gzip.decompress(got) == data
    assert got[8] == _gzipfile(data, level)[8]  # the XFL byte of the level
    ref = len(_gzipfile(data, level))
    assert len(got) <= ref * 1.01, (len(got), ref)  # each block primed with the last 32 KB: no loss to speak of
    assert trace_io.GZ_BLOCK * 10 < len(data)  # many blocks


def test_atomic_write_gz_and_its_threads_end(tmp_path):
    data = _events(8000)
    before = {t.name for t in threading.enumerate()}
    out = atomic_write(tmp_path / "t.json.gz", [data[i:i + 3000] for i in range(0, len(data), 3000)])
    assert gzip.decompress(out.read_bytes()) == data
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-trace-gzip") and t.name not in before]

    def parts():
        yield data
        raise TraceError("the writer failed")

    with pytest.raises(TraceError, match="writer failed"):
        atomic_write(tmp_path / "u.json.gz", parts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json.gz"]  # no half file, no temporary left
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-trace-gzip")]


def test_threads_within_the_ranks_share_of_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 ** 6))  # more ranks than cores: one helper thread
    assert ParallelGzip(io.BytesIO())._threads == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert ParallelGzip(io.BytesIO())._threads == 4


def test_a_helper_threads_error_reaches_the_writer(tmp_path, monkeypatch):
    real = trace_io._deflate_block

    def failing(block, level, primer, last):
        if primer:  # the second block on: a helper thread's work
            raise MemoryError("no memory for deflate (test)")
        return real(block, level, primer, last)

    monkeypatch.setattr(trace_io, "_deflate_block", failing)
    data = _events(8000)
    with pytest.raises(MemoryError, match="deflate"):
        atomic_write(tmp_path / "t.json.gz", [data])
    assert not list(tmp_path.iterdir())
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-trace-gzip")]
