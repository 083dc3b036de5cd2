"""How much a process keeps: the bounds the runtime, the serving engine and the formats share."""

# At most this many graph pairs (one per input signature: shapes, dtypes, device; or one per
# range with dynamic shapes) are kept; the least recently used is dropped first.
MAX_GRAPH_PAIRS = 8
# At most this many input signatures point at the pairs of ranged builds (dynamic shapes).
MAX_SIGNATURES = 256
