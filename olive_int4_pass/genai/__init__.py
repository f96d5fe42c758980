"""onnxruntime-genai packages: the package files and their atomic publishing (:mod:`.files`), the builder export
(:mod:`.export`), the published layout (:mod:`.packaging`), one onnxruntime runner for builder-layout decoders
(:mod:`.decoder`) and chat/generation with onnxruntime-genai (:mod:`.chat`). No Olive imports here."""
