"""fp8npu fpga."""
