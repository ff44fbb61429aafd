"""fp8npu FPGA flow: synthesis, place and route, bitstreams and programming (YoWASP tools)."""
