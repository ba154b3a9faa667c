"""Load profiles against online backends: :mod:`.runner` runs the points that
:mod:`pipeline.workload.profiles` plans, :mod:`.points` summarises and judges each point,
:mod:`.engine_metrics` reads the server's own Prometheus ``/metrics`` next to the client's
view. The streaming client the online backends send with is :mod:`.client` (one stream's
parsing: :mod:`.stream`; plain JSON GETs: :mod:`.http_json`)."""
