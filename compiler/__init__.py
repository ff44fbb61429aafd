"""The fp8npu compiler: torch modules to NPU programs, the GEMM lowering, the runtime and the CLI.

``fp8npu.compiler.compile(module, example_inputs, config=None, quant=None)`` returns a
:class:`~fp8npu.compiler.model.CompiledModel`; ``fp8npu.compiler.run(model, inputs,
backend="func")`` runs it; ``fp8npu.compiler.load(path)`` reads a saved ``.npu`` file.
(Imported on first use, so the command line starts without loading torch.)
"""

__all__ = ["compile", "load", "run", "QuantConfig", "CompiledModel", "Session"]

_LAZY = {"compile": "model", "load": "model", "QuantConfig": "model", "CompiledModel": "model",
         "run": "runtime", "Session": "runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
