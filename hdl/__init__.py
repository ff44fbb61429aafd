"""fp8npu hardware: Amaranth descriptions of the FP8 NPU and its arithmetic units."""
