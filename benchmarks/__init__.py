"""stemserve benchmarks: each layer measured side by side on one machine, in one run.

Run them all with ``python -m benchmarks.run_all`` from the repository root; see
``benchmarks/README.md``. Every script writes one section of
``benchmarks/results/<machine-name>.json`` (see :mod:`benchmarks.results` for the schema) and
the markdown table and plots are regenerated from that file.
"""
