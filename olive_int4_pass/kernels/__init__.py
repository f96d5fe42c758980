"""Numerics only (numpy/torch arrays in, arrays out; no graphs, no files): block-wise round to nearest in the
MatMulNBits format (:mod:`.rtn`), its streamed fast path (:mod:`.streaming_rtn`), the importance-weighted scale
search (:mod:`.scale_search`) and the format's shapes and byte counts (:mod:`.layout`)."""
