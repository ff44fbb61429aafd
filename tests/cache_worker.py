"""Build (or reuse) a tiny Verilator model through fp8npu's model cache, stream a few vectors
through it and check them; run as a separate process by tests/test_modelcache.py.

Prints ``ok <build folder>`` and exits 0 when every output is right."""

import sys

import numpy as np
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


class Adder(wiring.Component):
    """y = a + b, registered (latency 1)."""

    a: In(8)
    b: In(8)
    y: Out(8)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.y.eq(self.a + self.b)
        return m


def main():
    from fp8npu.sim.rtl import RTLModel

    model = RTLModel(Adder, "cache_adder", identity="tiny adder for the cache tests")
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    a = rng.integers(0, 256, (64, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 1), dtype=np.uint8)
    res = model.stream({"a": a, "b": b}, {"y": 1}, drain=2)
    got = res.outputs["y"][1:65, 0]
    want = (a[:, 0].astype(int) + b[:, 0]) % 256
    if not np.array_equal(got, want):
        print("wrong outputs", got[:8], want[:8])
        return 1
    print("ok", model.build_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
