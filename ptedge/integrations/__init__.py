"""Bridges from ptedge bundles to other engines (each module needs its own optional extra).

``ptedge.integrations.ray``: batch scoring with Ray Data (``pip install 'ptedge[ray]'``).
Nothing here is imported by ``ptedge.runtime``.
"""
