"""Development tooling of fastpatch: what only the tests and benchmarks use. Not installed (``setup.py``
packages ``fastpatch`` alone); importable from the repository root, which pytest (``pytest.ini``) and
``python -m bench...`` put on the path.

* :mod:`fastpatch_dev.aot`: ahead-of-time compiles for a GPU on the CPU, their resources, launch recording;
* :mod:`fastpatch_dev.compat`: what differs between the supported tritons for those compiles.
"""
