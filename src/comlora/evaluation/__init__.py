"""Evaluation: the task ``registry`` (``commonsense``, ``mmlu``, ``convai2``), ``generation``, ``text_metrics``,
``results`` (result files) and the ``llama_cpp`` generation backend."""
