"""Fused multi-head Engram row lookup, dense and row-sparse (see api.py and row_sparse.py)."""
from pallas_kernels.engram_lookup.api import engram_lookup
from pallas_kernels.engram_lookup.configs import (GpuLookupConfig, GpuSegmentSumConfig,
                                                  TpuLookupConfig)
from pallas_kernels.engram_lookup.row_sparse import (PrefetchedRows, RowSparse, densify,
                                                     expand_rows, gather_rows, prefetch_rows,
                                                     row_sparse_grad, unique_rows)

__all__ = ["engram_lookup", "GpuLookupConfig", "GpuSegmentSumConfig", "TpuLookupConfig",
           "PrefetchedRows", "RowSparse", "densify", "expand_rows", "gather_rows",
           "prefetch_rows", "row_sparse_grad", "unique_rows"]
