"""BERT-style encoders (BERT, RoBERTa): loaded with AutoModel (no task head); statistics from a probe of the
final hidden states."""

from . import HIDDEN_STATES, ModelAdapter, register

BERT = register(ModelAdapter(
    model_types=("bert", "roberta"), layers="encoder.layer",
    projections=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"),
    shared_inputs=(("attention.self.query", "attention.self.key", "attention.self.value"),),
    objective=HIDDEN_STATES,
))
