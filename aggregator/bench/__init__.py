"""`aggregator bench`: async views vs sync twins, serving modes, engines and FastAPI, measured.

plan (what is compared) -> servers (each target in its own process tree) -> load_tools (wrk or
the built-in generator, `loadgen`) -> runner (interleaved repetitions, into `results`) ->
summary (figures, flags, comparisons) -> report (table, files) and charts. `demo_control` and
`machine` serve the runner and the soak alike. Like the demo, it speaks to the servers under
test over HTTP only.
"""
