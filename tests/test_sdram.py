"""The SDR SDRAM controller (hdl/sdram.py) under Verilator against the checking SDRAM model
(sim/sdram_model.py): cocotbext-axi's AXI4 master and the host-bridge port, random transfers
over the whole chip, each read compared with a shadow memory, every command checked against
the datasheet timings, throughput measured."""

import json

import pytest
from fp8npu.hdl.sdram import CHIPS, SDRAMController
from fp8npu.sim.rtl import RTLModel, run_folder


@pytest.mark.parametrize("chip,clock_hz,data_bits,cas", [
    ("MT48LC16M16A2", 50_000_000, 64, 2),       # the ULX3S board build
    ("AS4C32M16SB", 133_000_000, 32, 3),        # a faster clock: CAS latency 3, a narrower bus
])
def test_sdram_controller_against_the_chip_model(chip, clock_hz, data_bits, cas):
    model = RTLModel(lambda: SDRAMController(chip, clock_hz, data_bits), f"sdram_{data_bits}",
                     identity=f"SDRAMController {chip} {clock_hz} {data_bits}")
    with run_folder(None, "fp8npu-sdram-") as folder:
        job = {"chip": chip, "clock_hz": clock_hz, "data_bits": data_bits, "seed": 7, "ops": 150,
               "result": str(folder / "result.json")}
        (folder / "job.json").write_text(json.dumps(job))
        model.run("fp8npu.sim.sdram_tb", {"FP8NPU_SDRAM_JOB": str(folder / "job.json")}, folder)
        result = json.loads((folder / "result.json").read_text())
    print(f"\nSDRAM {chip} at {clock_hz / 1e6:g} MHz, {data_bits}-bit AXI: {result['axi_writes']} writes, "
          f"{result['axi_reads']} reads, {result['bridge_words']} bridge words, {result['cycles']:,} clocks, "
          f"commands {result['commands']}; 16 KB read {result['read_bytes_per_clock']:.2f} B/clock, "
          f"write {result['write_bytes_per_clock']:.2f} B/clock (peak 2)")
    assert result["cas_latency"] == cas
    assert result["commands"]["REFRESH"] >= 10 and result["error_responses"] > 0
    assert result["read_bytes_per_clock"] > 1.6 and result["write_bytes_per_clock"] > 1.6


def test_sdram_parameters_are_checked():
    with pytest.raises(ValueError, match="AXI data width"):
        SDRAMController("MT48LC16M16A2", 50e6, data_bits=16)
    with pytest.raises(ValueError, match="too slow"):
        SDRAMController("MT48LC16M16A2", 2e6)
    assert CHIPS["MT48LC16M16A2"].bytes == 32 << 20 and CHIPS["AS4C32M16SB"].bytes == 64 << 20
