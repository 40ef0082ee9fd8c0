"""stemserve benchmarks: scenarios by question, each measured on one machine in one run.

``python -m benchmarks.run_all`` runs them (see ``benchmarks/README.md``); every scenario
writes one section of ``benchmarks/results/<machine-name>.json`` (:mod:`benchmarks.results`)
and its markdown table and plots are drawn from that file.
"""
