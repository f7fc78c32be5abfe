"""`aggregator bench`: async views vs sync twins, serving modes, engines and FastAPI, measured.

plan (what is compared) -> servers (each target in its own process tree) -> load (wrk or the
built-in generator) -> runner (interleaved repetitions) -> report (figures, flags, files, charts).
Like the demo, it speaks to the servers under test over HTTP only.
"""
