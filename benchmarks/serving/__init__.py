"""The served model: a real tritonserver on this machine, measured from the client's side."""

SCENARIOS: tuple[str, ...] = ("serving.sweep", "serving.perf_analyzer", "serving.transport",
                              "serving.fleet", "serving.soak")
