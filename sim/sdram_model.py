"""A behavioural SDR SDRAM chip for cocotb testbenches, wired to the pins of
:class:`fp8npu.hdl.sdram.SDRAMController` (``sd_*``) and checking the datasheet as it goes.

The chip is clocked by the controller's clock inverted, as on the boards: it acts on each
falling edge of ``clk``, where it samples the command the controller put out at the rising
edge before, and it drives a read's word from the falling edge CL - 1 cycles after the READ
(the controller captures it at the rising edge in between). Storage is the whole chip, filled
with pseudo-random bytes at power-up (a real chip's contents are unknown), so a design that
reads memory it never wrote does not get zeros by luck.

Every command is checked against the chip's timings (:class:`~fp8npu.hdl.sdram.SDRAMChip`, in
nanoseconds at the design's ``clock_hz``, independently of the clock counts the controller
derives): the power-up wait and initialization sequence, t_rcd, t_ras, t_rp, t_rc, t_rfc, t_wr,
t_mrd, a refresh at least every t_refi, commands only to open (READ/WRITE) or idle
(ACTIVE, REFRESH, LOAD MODE) banks, burst length 1 in the mode register, data driven on writes,
and no bus contention (the controller driving DQ while the chip answers a read). The first
violation raises :class:`SDRAMViolation`, which fails the cocotb test.
"""

import numpy as np
from cocotb.triggers import FallingEdge
from fp8npu.hdl.sdram import Command

__all__ = ["SDRAMModel", "SDRAMViolation"]


class SDRAMViolation(AssertionError):
    """The controller broke a rule of the SDRAM datasheet."""


class SDRAMModel:
    def __init__(self, dut, chip, clock_hz, seed=1, prefix="sd_"):
        self.dut, self.chip = dut, chip
        self.period = 1e9 / clock_hz
        self.pins = {name: getattr(dut, prefix + name) for name in
                     ("cs_n", "ras_n", "cas_n", "we_n", "ba", "a", "dqm", "dq_o", "dq_oe", "dq_i")}
        self.memory = bytearray(np.random.default_rng(seed).integers(0, 256, chip.bytes, dtype=np.uint8).tobytes())
        banks = 1 << chip.bank_bits
        never = -10 ** 9
        self.open_row = [None] * banks
        self.t_act = [never] * banks
        self.t_pre = [never] * banks
        self.t_write = [never] * banks
        self.t_refresh = never
        self.t_mode = never
        self.cas_latency = None
        self.init = []                      # the initialization commands seen, in order
        self.ready = False
        self.cycle = 0
        self.reads = {}                     # falling edge -> word to drive from it
        self.driving = False
        self.commands = {"ACTIVE": 0, "READ": 0, "WRITE": 0, "PRECHARGE": 0, "REFRESH": 0, "MODE": 0}

    # ---- checks ----
    def _fail(self, message):
        raise SDRAMViolation(f"SDRAM, clock {self.cycle}: {message}")

    def _since(self, when, ns, what):
        if (self.cycle - when) * self.period < ns - 1e-6:
            self._fail(f"{what}: {(self.cycle - when) * self.period:.1f} ns, the chip needs {ns:g} ns")

    def _no_recent_refresh_or_mode(self):
        self._since(self.t_refresh, self.chip.t_rc, "command after AUTO REFRESH")
        if self.cycle - self.t_mode < self.chip.t_mrd_clocks:
            self._fail(f"command {self.cycle - self.t_mode} clocks after LOAD MODE; the chip needs "
                       f"{self.chip.t_mrd_clocks}")

    def _all_idle(self, what):
        for b, row in enumerate(self.open_row):
            if row is not None:
                self._fail(f"{what} while bank {b} is open")
            self._since(self.t_pre[b], self.chip.t_rp, f"{what} after PRECHARGE of bank {b}")

    # ---- the chip ----
    async def run(self):
        pins = self.pins
        chip = self.chip
        while True:
            await FallingEdge(self.dut.clk)
            self.cycle += 1
            word = self.reads.pop(self.cycle, None)
            if word is not None:
                pins["dq_i"].value = word
                self.driving = True
            elif self.driving:
                pins["dq_i"].value = (0x5A5A ^ self.cycle * 0x9E37) & 0xFFFF     # nothing valid on DQ
                self.driving = False
            if self.ready and (self.cycle - self.t_refresh) * self.period > chip.t_refi:
                self._fail(f"no AUTO REFRESH for {(self.cycle - self.t_refresh) * self.period / 1000:.2f} us; "
                           f"the chip needs one every {chip.t_refi / 1000:g} us")
            if int(pins["cs_n"].value):
                continue
            code = int(pins["ras_n"].value) << 2 | int(pins["cas_n"].value) << 1 | int(pins["we_n"].value)
            if code == 0b111:                                   # NOP
                continue
            if self.driving and int(pins["dq_oe"].value):
                self._fail("the controller drives DQ while the chip answers a read")
            bank = int(pins["ba"].value)
            a = int(pins["a"].value)
            if self.cycle * self.period < chip.t_init:
                self._fail(f"a command {self.cycle * self.period / 1000:.1f} us after power-up; the chip needs "
                           f"{chip.t_init / 1000:g} us first")
            if code == Command.ACTIVE & 7:
                self._command_active(bank, a)
            elif code in (Command.READ & 7, Command.WRITE & 7):
                self._command_column(code == Command.WRITE & 7, bank, a)
            elif code == Command.PRECHARGE & 7:
                self._command_precharge(bank, a)
            elif code == Command.REFRESH & 7:
                self._command_refresh()
            elif code == Command.MODE & 7:
                self._command_mode(a)
            else:
                self._fail(f"command code {code:03b} (BURST TERMINATE) is not used by this controller")

    def _command_active(self, bank, row):
        self.commands["ACTIVE"] += 1
        if not self.ready:
            self._fail("ACTIVE before the initialization sequence (PRECHARGE ALL, 2 x AUTO REFRESH, LOAD MODE)")
        self._no_recent_refresh_or_mode()
        if self.open_row[bank] is not None:
            self._fail(f"ACTIVE to bank {bank}, which is open")
        self._since(self.t_pre[bank], self.chip.t_rp, f"ACTIVE after PRECHARGE of bank {bank}")
        self._since(self.t_act[bank], self.chip.t_rc, f"ACTIVE after ACTIVE of bank {bank}")
        self.open_row[bank] = row
        self.t_act[bank] = self.cycle

    def _command_column(self, write, bank, a):
        chip = self.chip
        self.commands["WRITE" if write else "READ"] += 1
        what = "WRITE" if write else "READ"
        self._no_recent_refresh_or_mode()
        row = self.open_row[bank]
        if row is None:
            self._fail(f"{what} to bank {bank}, which is not open")
        self._since(self.t_act[bank], chip.t_rcd, f"{what} after ACTIVE of bank {bank}")
        if a & (1 << 10):
            self._fail(f"{what} with auto precharge, which this controller does not use")
        col = a & ((1 << chip.col_bits) - 1)
        word = (row << (chip.bank_bits + chip.col_bits)) | (bank << chip.col_bits) | col
        if write:
            if not int(self.pins["dq_oe"].value):
                self._fail("WRITE without the controller driving DQ")
            value = int(self.pins["dq_o"].value)
            mask = int(self.pins["dqm"].value)
            for lane in range(2):
                if not mask >> lane & 1:
                    self.memory[2 * word + lane] = value >> (8 * lane) & 0xFF
            self.t_write[bank] = self.cycle
        else:
            self.reads[self.cycle + self.cas_latency - 1] = self.memory[2 * word] | self.memory[2 * word + 1] << 8

    def _command_precharge(self, bank, a):
        self.commands["PRECHARGE"] += 1
        self._no_recent_refresh_or_mode()
        banks = range(len(self.open_row)) if a & (1 << 10) else [bank]
        if not self.ready:
            if not a & (1 << 10) or self.init:
                self._fail("the initialization starts with one PRECHARGE ALL")
            self.init.append("PRECHARGE ALL")
        for b in banks:
            if self.open_row[b] is not None:
                self._since(self.t_act[b], self.chip.t_ras, f"PRECHARGE after ACTIVE of bank {b}")
                self._since(self.t_write[b], max(self.chip.t_wr, self.period), f"PRECHARGE after WRITE to bank {b}")
            self.open_row[b] = None
            self.t_pre[b] = self.cycle

    def _command_refresh(self):
        self.commands["REFRESH"] += 1
        self._no_recent_refresh_or_mode()
        self._all_idle("AUTO REFRESH")
        if not self.ready:
            if self.init not in (["PRECHARGE ALL"], ["PRECHARGE ALL", "REFRESH"]):
                self._fail(f"AUTO REFRESH out of the initialization order after {self.init}")
            self.init.append("REFRESH")
        self.t_refresh = self.cycle

    def _command_mode(self, a):
        self.commands["MODE"] += 1
        self._no_recent_refresh_or_mode()
        self._all_idle("LOAD MODE")
        if not self.ready and self.init != ["PRECHARGE ALL", "REFRESH", "REFRESH"]:
            self._fail(f"LOAD MODE before the initialization's PRECHARGE ALL and two AUTO REFRESH (saw {self.init})")
        burst, cl = a & 7, a >> 4 & 7
        if burst != 0 or a >> 3 & 1 or a >> 9 & 1:
            self._fail(f"mode register {a:#x}: this model takes burst length 1, sequential, burst writes "
                       f"as programmed")
        if cl not in (2, 3):
            self._fail(f"mode register {a:#x}: CAS latency {cl}; the chip takes 2 or 3")
        if cl == 2 and 1e9 / self.period > self.chip.max_cl2_hz:
            self._fail(f"CAS latency 2 at {1e3 / self.period:g} MHz; the chip takes it up to "
                       f"{self.chip.max_cl2_hz / 1e6:g} MHz")
        self.cas_latency = cl
        self.t_mode = self.cycle
        self.ready = True
