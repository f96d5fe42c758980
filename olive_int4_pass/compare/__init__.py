"""``olive-int4 compare``: build or reuse FP32/FP16/INT8/INT4 variants, score them (:mod:`.scoring`,
:mod:`.metrics`), time them (:mod:`.speed`) and write the report (:mod:`.report`); :func:`.run.compare` ties it
together."""
