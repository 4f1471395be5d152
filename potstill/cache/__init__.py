"""The teacher-signal cache: its byte format (``format``), building and reading (``store``), wiring into runs
(``run``), lookup into loss targets (``targets``) and the vLLM capture path (``vllm_capture``)."""
