"""Map the four top-level code folders onto the ``fp8npu`` namespace.

``hdl/`` becomes ``fp8npu.hdl`` and so on. Subpackages are discovered here, because an
explicit list in pyproject.toml silently leaves nested packages out of the wheel.
"""

from setuptools import find_packages, setup

FOLDERS = ("hdl", "compiler", "sim", "fpga")

packages = []
package_dir = {}
for folder in FOLDERS:
    packages.append(f"fp8npu.{folder}")
    package_dir[f"fp8npu.{folder}"] = folder
    for sub in find_packages(where=folder):
        packages.append(f"fp8npu.{folder}.{sub}")
        package_dir[f"fp8npu.{folder}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
