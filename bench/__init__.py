"""isobox benchmarks: ``python -m bench [NAME ...]`` (``make bench`` installs the peers).

Each benchmark is a module with ``NAME``, ``TITLE`` and ``run(config) -> Report`` that
describes its scenarios and hands them to ``bench.harness.measure``. Register it in
REGISTRY below; ``python -m bench`` runs every registered benchmark, or those named on the
command line, and writes ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

# benchmark name -> module that implements it, in the order `python -m bench` runs them.
REGISTRY: dict[str, str] = {
    "compute_run": "bench.compute_run",
    "image_import": "bench.image_import",
    "network_cost": "bench.network_cost",
    "runtime_start": "bench.runtime_start",
    "vm_start": "bench.vm_start",
    "vm_memory": "bench.vm_memory",
}
