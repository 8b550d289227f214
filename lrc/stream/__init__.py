"""Streaming: compress a model one decoder block at a time, never holding the whole model or its statistics.

- `shards`: the model as a skeleton on the meta device; each block's tensors are read from the safetensors
  shards (memory-mapped) when the walk reaches it and released after.
- `activations`: the hidden states between blocks, in memory under a byte budget, spilled to files beyond it.
- `layer_store`: each layer's statistics and decompositions on disk, keyed by what determines them (resume).
- `shard_writer`: the output's safetensors shards written tensor by tensor, the same bytes as `save_file`.
- `pipeline`: the stages of `lrc.pipeline.compress` with those residency policies.
"""
