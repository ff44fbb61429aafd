"""Lane harness: many copies of a small unit side by side, for bulk checking in RTL simulation.

Python work per clock edge dominates a cocotb run, so instead of one vector per cycle the
harness applies ``lanes`` independent vectors per cycle: every input port of the unit is
widened to ``lanes`` copies concatenated (lane 0 in the least significant bits). Several
variants of the unit (for instance each ``stages`` setting) can sit in one harness; they all
receive the same inputs and each has its own outputs, named ``<output>_<variant>``.
"""

from amaranth.hdl import Module, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["LaneHarness"]


class LaneHarness(wiring.Component):
    """``len(variants) x lanes`` instances of ``make_unit(variant)``.

    Parameters
    ----------
    make_unit : callable
        ``make_unit(variant)`` returns a fresh unit (a ``wiring.Component``).
    variants : sequence
        Variant keys; each becomes an output suffix.
    lanes : int
        Parallel copies per variant.
    inputs : dict
        Per-lane input ports of the unit and their widths; the harness port is ``width * lanes`` wide.
    outputs : dict
        Per-lane output ports of the unit and their widths.
    shared : dict
        Inputs given to every lane unchanged (for example a chain-start flag).
    """

    def __init__(self, make_unit, variants, lanes, inputs, outputs, shared=None):
        self.make_unit = make_unit
        self.variants = tuple(variants)
        self.lanes = lanes
        self.lane_inputs = dict(inputs)
        self.lane_outputs = dict(outputs)
        self.shared_inputs = dict(shared or {})
        members = {name: In(width * lanes) for name, width in self.lane_inputs.items()}
        members.update({name: In(width) for name, width in self.shared_inputs.items()})
        for variant in self.variants:
            for name, width in self.lane_outputs.items():
                members[f"{name}_{variant}"] = Out(width * lanes)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        for variant in self.variants:
            for lane in range(self.lanes):
                unit = self.make_unit(variant)
                m.submodules[f"u_{variant}_{lane}"] = unit
                for name, width in self.lane_inputs.items():
                    port = Value.cast(getattr(self, name))
                    m.d.comb += Value.cast(getattr(unit, name)).eq(port[lane * width:(lane + 1) * width])
                for name in self.shared_inputs:
                    m.d.comb += Value.cast(getattr(unit, name)).eq(getattr(self, name))
                for name, width in self.lane_outputs.items():
                    port = Value.cast(getattr(self, f"{name}_{variant}"))
                    m.d.comb += port[lane * width:(lane + 1) * width].eq(Value.cast(getattr(unit, name)))
        return m
