"""fp8npu compiler."""
