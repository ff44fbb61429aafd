"""fp8npu sim."""
