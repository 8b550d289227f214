"""BERT-style encoders (BERT, RoBERTa, XLM-R): loaded with AutoModel (a task head in the checkpoint is
left out); statistics from a probe of the final hidden states."""

from . import HIDDEN_STATES, ModelAdapter, register

BERT = register(ModelAdapter(
    model_types=("bert", "roberta", "xlm-roberta"), layers="encoder.layer",
    projections=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"),
    shared_inputs=(("attention.self.query", "attention.self.key", "attention.self.value"),),
    objective=HIDDEN_STATES,
    unused_heads=("cls.", "lm_head.", "classifier.", "qa_outputs."),  # masked-LM / task heads of *For* checkpoints
    optional_parts=(("pooler", "add_pooling_layer"),),  # a masked-LM checkpoint has no pooler: none is built
))
