"""Evaluators: classification (top-1/top-5/loss), the linear probe and its early stopping
(``linear_probe``), CrossTransformer attention maps (``fewshot_viz``)."""
