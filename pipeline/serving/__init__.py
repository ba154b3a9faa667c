"""Load profiles against online backends: :mod:`.runner` runs the points that
:mod:`pipeline.workload.profiles` plans, :mod:`.points` summarises and judges each point,
:mod:`.engine` reads the server's own Prometheus ``/metrics`` next to the client's view."""
