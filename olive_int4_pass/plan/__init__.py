"""Deciding how each weight is quantized before it is written: which MatMuls are candidates (:mod:`.candidates`),
calibration statistics from the float model (:mod:`.calibration`), measured sensitivity (:mod:`.sensitivity`),
and the per-weight plan - bits, searched scales, recorded errors (:mod:`.weight_plan`)."""
