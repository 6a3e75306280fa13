"""The synthetic world of coloured shapes and the bundled model trained on it: scenes, the
object checker, the tokenizer builder, the quality gates and training."""
